"""The adapter interface every payment provider implements.

Activities call providers only through this interface; the webhook receiver uses
``parse_callback`` to verify and decode a provider's callback.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from paysentinel.models import CreateTradeInput, ProviderCallback, Trade


class ProviderUnavailable(Exception):
    """A transient failure (timeout, 5xx, rate limit): worth retrying with backoff."""


class ProviderRejected(Exception):
    """A definitive answer (invalid parameters, inconsistent request): never retried."""

    def __init__(self, code: str, message: str):
        self.code = code
        super().__init__(f"{code}: {message}")


class MalformedCallback(Exception):
    """A correctly signed callback whose body we cannot understand."""


class Provider(Protocol):
    name: str

    async def create_trade(self, request: CreateTradeInput) -> Trade:
        """Create (or return the existing) trade for the order. Idempotent by order id."""

    async def query_trade(self, order_id: str) -> Trade:
        """The provider's current view; ``exists=False`` when it has no such trade."""

    async def close_trade(self, order_id: str, idempotency_key: str) -> Trade:
        """Close an unpaid trade. Returns the trade after the call: closed, or paid if the
        payer was faster; ``exists=False`` when the provider never had the trade."""

    def parse_callback(self, headers: Mapping[str, str], body: bytes) -> ProviderCallback:
        """Verify the signature over the raw body and decode it.

        Raises ``paysentinel.signing.SignatureError`` or ``MalformedCallback``."""
