"""What Stripe's answers mean for us: PaymentIntent, refund and event statuses, which errors
are transient and which are rejections, and Stripe's PaymentIntents and refunds read as our
trades and refunds. The adapter that makes the calls is paysentinel/providers/stripe.py."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any, Optional

import stripe as stripe_sdk  # the official library (this module is paysentinel.providers.stripe)

from paysentinel.models import (
    ProviderRefund,
    RefundStatus,
    Trade,
    TradeStatus,
)
from paysentinel.providers.base import (
    ProviderRejected,
    ProviderUnavailable,
)
from paysentinel.settlement import PAYMENT, REFUND


# --- What Stripe's answers mean ---------------------------------------------------------

# PaymentIntent status -> trade status. We capture automatically, so ``requires_capture``
# (an authorisation waiting for a manual capture) is not a payment.
TRADE_STATUSES = {
    "requires_payment_method": TradeStatus.WAIT_BUYER_PAY,
    "requires_confirmation": TradeStatus.WAIT_BUYER_PAY,
    "requires_action": TradeStatus.WAIT_BUYER_PAY,
    "requires_capture": TradeStatus.WAIT_BUYER_PAY,
    "processing": TradeStatus.PAYING,  # the payer's payment is under way: cannot be cancelled
    "succeeded": TradeStatus.TRADE_SUCCESS,
    "canceled": TradeStatus.TRADE_CLOSED,
}

REFUND_STATUSES = {
    "pending": RefundStatus.PROCESSING,
    "requires_action": RefundStatus.PROCESSING,
    "succeeded": RefundStatus.SUCCEEDED,
    "failed": RefundStatus.FAILED,
    "canceled": RefundStatus.FAILED,
}

# Webhook event type -> trade status it reports; other verified events are acknowledged.
EVENT_STATUSES = {
    "payment_intent.succeeded": TradeStatus.TRADE_SUCCESS,
    "payment_intent.processing": TradeStatus.PAYING,
    "payment_intent.canceled": TradeStatus.TRADE_CLOSED,
}

# Errors, transient (ProviderUnavailable: Temporal retries) or final (ProviderRejected):
#
#   APIConnectionError (timeout, connection refused/reset)        transient
#   RateLimitError (HTTP 429, incl. code lock_timeout / rate_limit) transient
#   APIError with HTTP >= 500, 409 (idempotent request in flight)  transient
#   any error whose code is in TRANSIENT_CODES                     transient
#   CardError (402: card_declined, ...)                            final, its code
#   InvalidRequestError (400/404: charge_already_refunded,
#     amount_too_large, resource_missing, ...)                     final, its code
#   IdempotencyError (a key reused with other parameters)          final, idempotency_error
#   AuthenticationError (401) / PermissionError (403)              final
TRANSIENT_CODES = frozenset({"lock_timeout", "rate_limit", "idempotency_key_in_use", "api_error"})
TRANSIENT_HTTP = frozenset({409})

# Stripe's answers whose meaning the adapter handles itself.
UNEXPECTED_STATE = "payment_intent_unexpected_state"
RESOURCE_MISSING = "resource_missing"

# Currencies Stripe settles, among the ones we accept (same minor-unit exponent as ISO 4217).
STRIPE_CURRENCIES = frozenset({"CNY", "USD", "EUR", "GBP", "HKD", "SGD", "JPY", "KRW"})
METADATA_VALUE_MAX = 500  # characters in a metadata value
DESCRIPTION_MAX = 1000
BILL_PAGE_SIZE = 100
BILL_PAYMENT_TYPES = {"charge": PAYMENT, "payment": PAYMENT, "refund": REFUND, "payment_refund": REFUND}
# A create answered with a 5xx is saved under its key by Stripe and replayed: after one, the
# refund is looked for and, when absent, created under the next derived key (at most this many).
REFUND_KEY_ROUNDS = 3


def error_code(err: stripe_sdk.StripeError) -> str:
    """The error's code (``lock_timeout``, ``resource_missing``...) or its type."""
    code = getattr(err, "code", None)
    body = err.json_body if isinstance(err.json_body, dict) else {}
    detail = body.get("error") if isinstance(body.get("error"), dict) else None
    detail = detail or {}
    return str(code or detail.get("code") or detail.get("type") or type(err).__name__)


def classify(err: stripe_sdk.StripeError, what: str) -> Exception:
    """The library's exception as ours: ProviderUnavailable (transient) or ProviderRejected."""
    code = error_code(err)
    status = err.http_status
    message = f"{what}: HTTP {status} {code}: {err.user_message or err}"
    if isinstance(err, (stripe_sdk.APIConnectionError, stripe_sdk.RateLimitError)) or code in TRANSIENT_CODES:
        return ProviderUnavailable(message)
    if isinstance(err, stripe_sdk.APIError) and (status is None or status >= 500 or status in TRANSIENT_HTTP):
        return ProviderUnavailable(message)
    if isinstance(err, stripe_sdk.CardError):
        return ProviderRejected(getattr(err, "code", None) or "card_error", message)
    if isinstance(err, stripe_sdk.IdempotencyError):
        return ProviderRejected("idempotency_error", message)
    if isinstance(err, stripe_sdk.AuthenticationError):
        return ProviderRejected("authentication_error", message)
    if isinstance(err, stripe_sdk.PermissionError):
        return ProviderRejected("permission_error", message)
    return ProviderRejected(code, message)


def from_unix(seconds: Any) -> Optional[datetime]:
    return datetime.fromtimestamp(int(seconds), timezone.utc) if seconds else None


def order_of(intent: Mapping[str, Any]) -> Optional[str]:
    metadata = intent.get("metadata") or {}
    return metadata.get("order_id") if isinstance(metadata, Mapping) else None


def trade_of(intent: Mapping[str, Any], order_id: Optional[str] = None) -> Trade:
    """A PaymentIntent (a dict) as our trade."""
    status = TRADE_STATUSES.get(intent["status"])
    if status is None:
        raise ProviderRejected("unknown_status", f"PaymentIntent {intent['id']} has status {intent['status']!r}")
    charge = intent.get("latest_charge")
    paid_at = None
    if status.is_paid:
        paid_at = from_unix(charge.get("created")) if isinstance(charge, Mapping) else None
    return Trade(
        order_id=order_of(intent) or order_id or "",
        trade_no=intent["id"],
        status=status,
        amount_minor=int(intent["amount_received"] if status.is_paid else intent["amount"]),
        currency=str(intent["currency"]).upper(),
        pay_url=intent.get("client_secret"),
        paid_at=paid_at,
    )


def refund_of(refund: Mapping[str, Any], refund_id: str) -> ProviderRefund:
    status = REFUND_STATUSES.get(refund["status"])
    if status is None:
        raise ProviderRejected("unknown_status", f"refund {refund['id']} has status {refund['status']!r}")
    intent = refund.get("payment_intent")
    return ProviderRefund(
        refund_id=refund_id,
        trade_no=intent["id"] if isinstance(intent, Mapping) else str(intent or ""),
        amount_minor=int(refund["amount"]),
        status=status,
        fail_reason=refund.get("failure_reason") if status is RefundStatus.FAILED else None,
    )


def is_our_refund(refund: Mapping[str, Any], refund_id: str) -> bool:
    return (refund.get("metadata") or {}).get("refund_id") == refund_id


def pick_refund(refunds: list[dict[str, Any]], refund_id: str) -> Optional[dict[str, Any]]:
    """Of a PaymentIntent's refunds, the one standing for our refund id: a live one (pending,
    requires_action, succeeded) when there is one, else the newest failed one."""
    mine = sorted((r for r in refunds if is_our_refund(r, refund_id)), key=lambda r: (r.get("created") or 0, r["id"]))
    live = [r for r in mine if REFUND_STATUSES.get(r["status"]) is not RefundStatus.FAILED]
    if live:
        return live[-1]
    return mine[-1] if mine else None


def header_value(headers: Mapping[str, str], name: str) -> Optional[str]:
    value = headers.get(name)
    if value is None:
        lowered = name.lower()
        value = next((v for k, v in headers.items() if k.lower() == lowered), None)
    return value
