"""The adapter interface every payment provider implements.

Activities call providers only through this interface; the webhook receiver uses
``parse_callback`` to verify and decode a provider's callback.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from datetime import date
from typing import Protocol

from typing import Optional

from paysentinel.models import CreateTradeInput, ProviderCallback, ProviderRefund, RefundInput, Trade


class ProviderUnavailable(Exception):
    """A transient failure (timeout, 5xx, rate limit): worth retrying with backoff."""


class ProviderRejected(Exception):
    """A definitive answer (invalid parameters, inconsistent request, risk hold, refund
    over the paid amount): never retried."""

    def __init__(self, code: str, message: str):
        self.code = code
        super().__init__(f"{code}: {message}")


class MalformedCallback(Exception):
    """A correctly signed callback whose body we cannot understand."""


class Provider(Protocol):
    name: str

    async def create_trade(self, request: CreateTradeInput) -> Trade:
        """Create (or return the existing) trade for the order. Idempotent by order id."""

    async def query_trade(self, order_id: str, trade_no: Optional[str] = None) -> Trade:
        """The provider's current view; ``exists=False`` when it has no such trade. With
        ``trade_no``, that trade of the order (an order paid twice has two)."""

    async def close_trade(self, order_id: str, idempotency_key: str) -> Trade:
        """Close an unpaid trade. Returns the trade after the call: closed, or paid if the
        payer was faster; ``exists=False`` when the provider never had the trade."""

    async def refund(self, request: RefundInput, idempotency_key: str) -> ProviderRefund:
        """Refund part or all of a paid trade. Idempotent by ``request.refund_id`` (the
        provider's out_request_no): the same id again never refunds twice; resubmitting
        a failed refund with the same id retries it."""

    async def query_refund(self, order_id: str, refund_id: str) -> Optional[ProviderRefund]:
        """The refund's current status; None when the provider has no such refund."""

    def bill_lines(self, day: date) -> AsyncIterator[str]:
        """The day's settlement bill as text, in pieces as it arrives (see paysentinel.settlement)."""

    def parse_callback(self, headers: Mapping[str, str], body: bytes) -> ProviderCallback:
        """Verify the signature over the raw body and decode it.

        Raises ``paysentinel.signing.SignatureError`` or ``MalformedCallback``."""
