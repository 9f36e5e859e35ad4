"""The adapter interface every payment provider implements.

Activities call providers only through this interface; the webhook receiver uses
``parse_callback`` to verify and decode a provider's callback and ``callback_reply`` to
answer it the way that provider expects (Alipay wants the literal ``success``, WeChat Pay
an empty 204 or ``{"code": "FAIL"}``, Stripe any 2xx).

Errors: a provider answer that means "try again later" raises ``ProviderUnavailable``
(Temporal retries it within the activity's bounds); one that means "no" raises
``ProviderRejected`` with the provider's code (never retried). Each adapter keeps its own
table of which codes are which.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from datetime import date
from typing import Optional, Protocol
from zoneinfo import ZoneInfo

from paysentinel.models import CreateTradeInput, ProviderCallback, ProviderRefund, RefundInput, Trade
from paysentinel.settlement import SettlementRow


class ProviderUnavailable(Exception):
    """A transient failure (timeout, 5xx, rate limit, a provider's "system busy" code):
    worth retrying with backoff."""


class ProviderRejected(Exception):
    """A definitive answer (invalid parameters, inconsistent request, risk hold, refund
    over the paid amount): never retried."""

    def __init__(self, code: str, message: str):
        self.code = code
        super().__init__(f"{code}: {message}")


class MalformedCallback(Exception):
    """A correctly signed callback whose body we cannot understand."""


class CallbackIgnored(Exception):
    """A correctly signed notification that carries nothing for a payment's workflow (a
    refund notice, an event type we do not use): acknowledged, so the provider stops
    resending it, and not delivered."""


@dataclass(frozen=True)
class CallbackReply:
    """What the webhook receiver answers a provider: status, body, content type, headers."""

    status: int
    body: bytes = b""
    media_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)


def json_reply(status: int, content: object) -> CallbackReply:
    return CallbackReply(status, json.dumps(content, ensure_ascii=False).encode())


class Provider(Protocol):
    name: str

    def check_order(self, order_id: str, amount_minor: int, currency: str) -> Optional[str]:
        """Why this provider cannot take the order (an order number too long for it, a
        currency it does not settle), or None. Checked at checkout, before anything starts."""

    async def create_trade(self, request: CreateTradeInput) -> Trade:
        """Create (or return the existing) trade for the order. Idempotent by order id.
        ``trade_no`` may be None when the provider numbers a trade only once the payer
        scans (Alipay precreate)."""

    async def query_trade(
        self, order_id: str, trade_no: Optional[str] = None, *, created_trade_no: Optional[str] = None
    ) -> Trade:
        """The provider's current view; ``exists=False`` when it has no such trade. With
        ``trade_no``, that trade of the order (an order paid twice has two).
        ``created_trade_no`` is the provider's number of the trade ``create_trade``
        returned, for providers that cannot look a trade up by our order number (Stripe)."""

    async def close_trade(self, order_id: str, idempotency_key: str, *, created_trade_no: Optional[str] = None) -> Trade:
        """Close an unpaid trade. Returns the trade after the call: closed, paid if the
        payer was faster, ``PAYING`` while the payer's payment is under way (such a trade
        cannot be closed: ask again later); ``exists=False`` when the provider never had it."""

    async def refund(self, request: RefundInput, idempotency_key: str) -> ProviderRefund:
        """Refund part or all of a paid trade. Idempotent by ``request.refund_id`` (the
        provider's out_request_no / out_refund_no / metadata): the same id again never
        refunds twice; resubmitting a failed refund with the same id retries it."""

    async def query_refund(self, order_id: str, refund_id: str, trade_no: Optional[str] = None) -> Optional[ProviderRefund]:
        """The refund's current status; None when the provider has no such refund.
        ``trade_no`` is the refunded trade (needed by providers that file refunds under it)."""

    def bill_rows(self, day: date, tz: ZoneInfo) -> AsyncIterator[SettlementRow]:
        """The day's settlement bill (the day in ``tz``) as common rows, read as it streams in.
        Raises ``paysentinel.settlement.BillFormatError`` for a bill that cannot be read."""

    def parse_callback(self, headers: Mapping[str, str], body: bytes) -> ProviderCallback:
        """Verify the signature over the raw body and decode it.

        Raises ``paysentinel.signing.SignatureError``, ``MalformedCallback`` or ``CallbackIgnored``."""

    def callback_reply(self, status: int, detail: object) -> CallbackReply:
        """The answer to a callback: ``status`` is the receiver's verdict (2xx accepted;
        400/401/413 refused; 503 not accepted yet: resend), ``detail`` what it says about it
        (the outcome's fields, or an error message)."""
