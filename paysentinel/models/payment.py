"""The payment workflow's input and state, the provider's callbacks, and the inputs and
results of the payment's activities (trades, risk checks, the payment's database record)."""

from __future__ import annotations

from datetime import datetime
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

from paysentinel.models.checkout import CheckoutRequest, RefundView, TimelineEntry
from paysentinel.models.common import PaymentStatus, TradeStatus

# --- Workflow input and messages ----------------------------------------------------


class PaymentTiming(BaseModel):
    callback_timeout_seconds: float
    query_backoff_seconds: list[float]
    payment_ttl_seconds: float
    resend_window_seconds: float
    close_attempts: int
    provider_retry_initial_seconds: float
    provider_max_attempts: int
    refund_window_seconds: float = 0.0
    refund_submissions: int = 3
    review_escalate_seconds: float = 3600.0
    review_deadline_seconds: float = 86400.0
    notify_max_attempts: int = 8
    notify_retry_initial_seconds: float = 2.0


class PaymentState(BaseModel):
    """What a paid payment carries into its refund phase (continue-as-new): the money,
    the refunds, what the customer was told, and the timeline so far."""

    status: PaymentStatus
    base: PaymentStatus
    seq: int
    trade_no: Optional[str] = None
    pay_url: Optional[str] = None
    reason: Optional[str] = None
    review_reason: Optional[str] = None
    paid_at: Optional[datetime] = None
    expires_at: Optional[datetime] = None
    final_at: datetime
    captured: dict[str, int] = Field(default_factory=dict)
    refunded: dict[str, int] = Field(default_factory=dict)
    kept: dict[str, int] = Field(default_factory=dict)
    accepted: Optional[str] = None
    refunds: dict[str, RefundView] = Field(default_factory=dict)
    reviews: int = 0
    told: list[str] = Field(default_factory=list)
    seen_events: list[str] = Field(default_factory=list)
    timeline: list[TimelineEntry] = Field(default_factory=list)
    alerted: bool = False


class OrderCustomer(BaseModel):
    """The payer's contact details as the workflow keeps them (see PaymentOrder)."""

    model_config = ConfigDict(extra="ignore")
    email: Optional[str] = None
    phone: Optional[str] = None


class PaymentOrder(BaseModel):
    """The order a payment workflow runs, apart from the API's CheckoutRequest.

    Workflow histories keep it for as long as a payment lives, and every release's code
    decodes it again on replay. So it has the field names, types and defaults of
    CheckoutRequest as first recorded, ignores fields it does not know, and validates
    nothing the API checks (a limit the API tightens later must not make a recorded
    history undecodable). Renaming a field of CheckoutRequest changes ``of`` only.
    """

    model_config = ConfigDict(extra="ignore")

    order_id: str
    amount_minor: int
    currency: str = "CNY"
    provider: str = "simulator"
    subject: str = ""
    customer: OrderCustomer = Field(default_factory=OrderCustomer)
    notify_url: Optional[str] = None
    client_ip: Optional[str] = None
    device_id: Optional[str] = None
    expires_in_seconds: Optional[float] = None

    @classmethod
    def of(cls, request: CheckoutRequest) -> "PaymentOrder":
        """The order of a validated checkout request."""
        return cls(
            order_id=request.order_id,
            amount_minor=request.amount_minor,
            currency=request.currency,
            provider=request.provider,
            subject=request.subject,
            customer=OrderCustomer(email=request.customer.email, phone=request.customer.phone),
            notify_url=request.notify_url,
            client_ip=request.client_ip,
            device_id=request.device_id,
            expires_in_seconds=request.expires_in_seconds,
        )


class PaymentInput(BaseModel):
    payment_id: str
    request: PaymentOrder  # the order as the checkout API accepted it (not the API's own model)
    notify_url: str
    timing: PaymentTiming
    resume: Optional[PaymentState] = None  # set when the payment continues into its refund phase


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
    source: str = "callback"  # or "settlement": a row of the provider's daily bill


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
    trade_no: Optional[str] = None  # one trade of the order; None: the order's trade
    # The provider's number of the trade we created, for providers that cannot look a trade
    # up by our order number (Stripe's PaymentIntent id).
    created_trade_no: Optional[str] = None


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


class RiskCheckInput(BaseModel):
    payment_id: str
    request: PaymentOrder


class RiskVerdict(BaseModel):
    flagged: bool
    hits: list[str] = Field(default_factory=list)


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
    refunded_minor: int = 0
    paid_at: Optional[datetime] = None
    expires_at: Optional[datetime] = None
    event: str = ""
    # The lifecycle's own outcome (SUCCEEDED, FAILED or CLOSED) once there is one; later
    # refunds and reviews do not change it. The monitor's failure and timeout rates read it.
    outcome: Optional[PaymentStatus] = None
    callback_received_at: Optional[datetime] = None  # when a callback caused this transition


class RecordPaymentInput(BaseModel):
    payment_id: str
    request: PaymentOrder
    expires_at: datetime


class CallbackOutcome(BaseModel):
    """What the webhook receiver answers the provider."""

    result: Literal["delivered", "duplicate", "unknown_payment", "payment_completed"]
    event_id: str
    payment_id: Optional[str] = None
