"""Every model that crosses a boundary (HTTP, workflow, activity, signal, update).

Amounts are integer minor units (fen, cents) everywhere inside paysentinel; providers
that speak decimal strings ("99.90") are converted at the adapter.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from enum import Enum
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, EmailStr, Field, field_validator

ORDER_ID_PATTERN = r"^[A-Za-z0-9_\-]{1,64}$"
# ISO 4217 minor-unit exponents for the currencies we accept.
CURRENCY_EXPONENTS = {"CNY": 2, "USD": 2, "EUR": 2, "GBP": 2, "HKD": 2, "SGD": 2, "JPY": 0, "KRW": 0}


class PaymentStatus(str, Enum):
    CREATED = "CREATED"  # recorded, no trade at the provider yet
    PENDING = "PENDING"  # trade created, waiting for the payer / the callback
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"  # no money moved; the trade could not be created
    CLOSED = "CLOSED"  # unpaid: closed at the provider when its time to live ended
    IN_REVIEW = "IN_REVIEW"  # money state needs a person (contradicting or unknown result)

    @property
    def is_final(self) -> bool:
        return self in FINAL_STATUSES


FINAL_STATUSES = frozenset(
    {PaymentStatus.SUCCEEDED, PaymentStatus.FAILED, PaymentStatus.CLOSED, PaymentStatus.IN_REVIEW}
)


class TradeStatus(str, Enum):
    """Alipay-like trade statuses, as the provider reports them."""

    WAIT_BUYER_PAY = "WAIT_BUYER_PAY"
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
    """"123.45" CNY -> 12345. Raises ValueError on more decimals than the currency has."""
    exponent = CURRENCY_EXPONENTS[currency]
    value = Decimal(amount).scaleb(exponent)
    if value != value.to_integral_value():
        raise ValueError(f"amount {amount!r} has more than {exponent} decimals for {currency}")
    return int(value)


# --- Checkout API -------------------------------------------------------------------


class Customer(BaseModel):
    model_config = ConfigDict(extra="forbid")
    email: Optional[EmailStr] = None
    phone: Optional[str] = Field(None, pattern=r"^\+?[0-9 \-]{5,20}$")


class CheckoutRequest(BaseModel):
    """What the checkout service sends to start a payment."""

    model_config = ConfigDict(extra="forbid")

    order_id: str = Field(..., pattern=ORDER_ID_PATTERN, description="Merchant order number")
    amount_minor: int = Field(..., gt=0, le=10**12, description="Amount in minor units (fen, cents)")
    currency: str = Field("CNY", description="ISO 4217 code")
    provider: str = Field("simulator", description="Payment provider adapter")
    subject: str = Field("", max_length=128, description="What the customer pays for")
    customer: Customer = Field(default_factory=Customer)
    expires_in_seconds: Optional[float] = Field(
        None, ge=5, le=7 * 24 * 3600, description="Payment time to live; default from settings"
    )

    @field_validator("currency")
    @classmethod
    def _known_currency(cls, value: str) -> str:
        value = value.upper()
        if value not in CURRENCY_EXPONENTS:
            raise ValueError(f"unsupported currency {value!r}; use one of {sorted(CURRENCY_EXPONENTS)}")
        return value


class TimelineEntry(BaseModel):
    at: datetime
    event: str
    detail: str = ""


class PaymentView(BaseModel):
    """A payment as the API, the CLI and the workflow query show it."""

    payment_id: str
    order_id: str
    status: PaymentStatus
    amount_minor: int
    currency: str
    provider: str
    pay_url: Optional[str] = None
    trade_no: Optional[str] = None
    reason: Optional[str] = None
    review_reason: Optional[str] = None
    expires_at: Optional[datetime] = None
    timeline: list[TimelineEntry] = Field(default_factory=list)


# --- Workflow input and messages ----------------------------------------------------


class PaymentTiming(BaseModel):
    callback_timeout_seconds: float
    query_backoff_seconds: list[float]
    payment_ttl_seconds: float
    resend_window_seconds: float
    close_attempts: int
    provider_retry_initial_seconds: float
    provider_max_attempts: int


class PaymentInput(BaseModel):
    payment_id: str
    request: CheckoutRequest
    notify_url: str
    timing: PaymentTiming


class ProviderCallback(BaseModel):
    """A verified callback, as the webhook receiver delivers it to the workflow."""

    event_id: str
    provider: str
    order_id: str
    trade_no: str
    trade_status: TradeStatus
    amount_minor: int
    currency: str
    paid_at: Optional[datetime] = None
    received_at: datetime


# --- Activity inputs and results ----------------------------------------------------


class CreateTradeInput(BaseModel):
    provider: str
    order_id: str
    amount_minor: int
    currency: str
    subject: str
    notify_url: str
    expires_at: datetime
    idempotency_key: str


class TradeRef(BaseModel):
    provider: str
    order_id: str
    idempotency_key: str = ""


class Trade(BaseModel):
    """The provider's view of a trade. ``exists`` is False when the provider has none."""

    exists: bool = True
    order_id: str
    trade_no: Optional[str] = None
    status: Optional[TradeStatus] = None
    amount_minor: Optional[int] = None
    currency: Optional[str] = None
    pay_url: Optional[str] = None
    paid_at: Optional[datetime] = None


class PaymentRecord(BaseModel):
    """A snapshot of the payment that the workflow writes to the database.

    ``seq`` grows with every transition; the database keeps only the newest snapshot,
    so a retried or reordered write never moves a payment backwards.
    """

    payment_id: str
    seq: int
    status: PaymentStatus
    trade_no: Optional[str] = None
    pay_url: Optional[str] = None
    reason: Optional[str] = None
    review_reason: Optional[str] = None
    paid_amount_minor: Optional[int] = None
    paid_at: Optional[datetime] = None
    expires_at: Optional[datetime] = None
    event: str = ""


class RecordPaymentInput(BaseModel):
    payment_id: str
    request: CheckoutRequest
    expires_at: datetime


class CallbackOutcome(BaseModel):
    """What the webhook receiver answers the provider."""

    result: Literal["delivered", "duplicate", "unknown_payment", "payment_completed"]
    event_id: str
    payment_id: Optional[str] = None
