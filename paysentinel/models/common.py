"""What every payment model shares: statuses, review reasons and actions, notification kinds,
and currency amounts in minor units.

Amounts are integer minor units (fen, cents) everywhere inside paysentinel; providers
that speak decimal strings ("99.90") are converted at the adapter (``to_major``, ``to_minor``).
"""

from __future__ import annotations

from decimal import Decimal
from enum import Enum

ORDER_ID_PATTERN = r"^[A-Za-z0-9_\-]{1,64}$"
# ISO 4217 minor-unit exponents for the currencies we accept.
CURRENCY_EXPONENTS = {"CNY": 2, "USD": 2, "EUR": 2, "GBP": 2, "HKD": 2, "SGD": 2, "JPY": 0, "KRW": 0}


class PaymentStatus(str, Enum):
    CREATED = "CREATED"  # recorded, no trade at the provider yet
    PENDING = "PENDING"  # trade created, waiting for the payer / the callback
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"  # no money moved; the trade could not be created
    CLOSED = "CLOSED"  # unpaid: closed at the provider when its time to live ended
    IN_REVIEW = "IN_REVIEW"  # a person decides (risk, contradicting or unknown result, failed refund)
    REFUNDING = "REFUNDING"  # captured money is being returned
    PARTIALLY_REFUNDED = "PARTIALLY_REFUNDED"
    REFUNDED = "REFUNDED"  # everything captured was returned

    @property
    def is_final(self) -> bool:
        return self in FINAL_STATUSES


FINAL_STATUSES = frozenset(
    {
        PaymentStatus.SUCCEEDED,
        PaymentStatus.FAILED,
        PaymentStatus.CLOSED,
        PaymentStatus.IN_REVIEW,
        PaymentStatus.REFUNDING,
        PaymentStatus.PARTIALLY_REFUNDED,
        PaymentStatus.REFUNDED,
    }
)


class ReviewReason(str, Enum):
    RISK_RULE = "risk_rule"  # our own rules flagged the payment before any money moved
    PROVIDER_RISK = "provider_risk"  # the provider's risk control held the payment
    AMOUNT_MISMATCH = "amount_mismatch"  # paid amount or currency differs from the order
    STATUS_UNKNOWN = "status_unknown"  # the provider never confirmed paid or unpaid
    REFUND_FAILED = "refund_failed"  # a refund exhausted its retries
    SETTLEMENT_MISMATCH = "settlement_mismatch"  # the provider's settlement bill disagrees with us


class ReviewAction(str, Enum):
    APPROVE = "approve"  # let the payment go on as it is
    REJECT = "reject"  # stop it; money already captured is refunded
    REFUND = "refund"  # refund what was captured (or retry a failed refund)
    MARK_PAID = "mark_paid"  # the operator confirmed the payment with the provider


# What an operator may do for each reason, and what happens when nobody decides in time.
REVIEW_ACTIONS: dict[ReviewReason, tuple[list[ReviewAction], ReviewAction]] = {
    ReviewReason.RISK_RULE: ([ReviewAction.APPROVE, ReviewAction.REJECT], ReviewAction.REJECT),
    ReviewReason.PROVIDER_RISK: ([ReviewAction.APPROVE, ReviewAction.REJECT], ReviewAction.REJECT),
    ReviewReason.AMOUNT_MISMATCH: ([ReviewAction.APPROVE, ReviewAction.REJECT, ReviewAction.REFUND], ReviewAction.REFUND),
    ReviewReason.STATUS_UNKNOWN: ([ReviewAction.MARK_PAID, ReviewAction.REJECT], ReviewAction.REJECT),
    ReviewReason.REFUND_FAILED: ([ReviewAction.REFUND, ReviewAction.REJECT], ReviewAction.REFUND),
    # approve: our record stands (finance takes it up with the provider); refund: give it back.
    ReviewReason.SETTLEMENT_MISMATCH: ([ReviewAction.APPROVE, ReviewAction.REFUND], ReviewAction.APPROVE),
}


class NotifyKind(str, Enum):
    """Outcomes the customer (and the merchant's notification URL) hears about."""

    PAID = "paid"
    FAILED = "failed"
    CLOSED = "closed"
    REFUND_STARTED = "refund_started"
    REFUNDED = "refunded"
    IN_REVIEW = "in_review"


class RefundStatus(str, Enum):
    PROCESSING = "PROCESSING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"


class TradeStatus(str, Enum):
    """Alipay-like trade statuses, as the provider reports them."""

    WAIT_BUYER_PAY = "WAIT_BUYER_PAY"
    # The payer's payment is under way (WeChat Pay USERPAYING, a Stripe PaymentIntent
    # "processing"): not paid yet, and the trade cannot be closed until it ends.
    PAYING = "PAYING"
    TRADE_SUCCESS = "TRADE_SUCCESS"
    TRADE_FINISHED = "TRADE_FINISHED"
    TRADE_CLOSED = "TRADE_CLOSED"

    @property
    def is_paid(self) -> bool:
        return self in (TradeStatus.TRADE_SUCCESS, TradeStatus.TRADE_FINISHED)


def to_major(amount_minor: int, currency: str) -> str:
    """12345 CNY -> "123.45" (the provider's decimal string)."""
    exponent = CURRENCY_EXPONENTS[currency]
    return f"{Decimal(amount_minor).scaleb(-exponent):.{exponent}f}"


def to_minor(amount: str, currency: str) -> int:
    """ "123.45" CNY -> 12345. Raises ValueError on more decimals than the currency has."""
    exponent = CURRENCY_EXPONENTS[currency]
    value = Decimal(amount).scaleb(exponent)
    if value != value.to_integral_value():
        raise ValueError(f"amount {amount!r} has more than {exponent} decimals for {currency}")
    return int(value)
