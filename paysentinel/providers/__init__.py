"""Payment provider adapters, looked up by name.

``PAYSENTINEL_PROVIDERS`` lists the ones a deployment uses; each real provider's module
builds its adapter from the settings (and says which setting is missing when one is).
"""

from __future__ import annotations

import importlib

import httpx

from paysentinel.config import Settings
from paysentinel.providers.base import (
    CallbackIgnored,
    CallbackReply,
    MalformedCallback,
    Provider,
    ProviderRejected,
    ProviderUnavailable,
)

# name -> module that defines ``build(settings, http) -> Provider``
MODULES = {
    "simulator": "paysentinel.providers.simulator",
    "alipay": "paysentinel.providers.alipay",
    "wechatpay": "paysentinel.providers.wechatpay",
    "stripe": "paysentinel.providers.stripe",
}
SUPPORTED_PROVIDERS = tuple(MODULES)

__all__ = [
    "CallbackIgnored",
    "CallbackReply",
    "MalformedCallback",
    "Provider",
    "ProviderRejected",
    "ProviderUnavailable",
    "build_providers",
    "SUPPORTED_PROVIDERS",
]


class ProviderSettingsError(ValueError):
    """A provider is listed in PAYSENTINEL_PROVIDERS but its settings are incomplete."""


def build_providers(settings: Settings, http: httpx.AsyncClient) -> dict[str, Provider]:
    providers: dict[str, Provider] = {}
    for name in settings.providers:
        if name not in MODULES:
            raise ProviderSettingsError(
                f"PAYSENTINEL_PROVIDERS: unknown provider {name!r}; supported: {', '.join(SUPPORTED_PROVIDERS)}"
            )
        providers[name] = importlib.import_module(MODULES[name]).build(settings, http)
    return providers
