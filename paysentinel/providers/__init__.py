"""Payment provider adapters, looked up by name."""

from __future__ import annotations

import httpx

from paysentinel.config import Settings
from paysentinel.providers.base import MalformedCallback, Provider, ProviderRejected, ProviderUnavailable
from paysentinel.providers.simulator import SimulatorProvider

SUPPORTED_PROVIDERS = ("simulator",)

__all__ = ["MalformedCallback", "Provider", "ProviderRejected", "ProviderUnavailable", "build_providers", "SUPPORTED_PROVIDERS"]


def build_providers(settings: Settings, http: httpx.AsyncClient) -> dict[str, Provider]:
    return {
        "simulator": SimulatorProvider(
            http, settings.effective_simulator_url,
            # During a rotation callbacks signed with the previous secret are accepted too.
            (settings.simulator_webhook_secret, settings.simulator_webhook_secret_previous),
            settings.webhook_tolerance_seconds,
        )
    }
