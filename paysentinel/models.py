"""Every model that crosses a boundary (HTTP, workflow, activity, signal, update).

Amounts are integer minor units (fen, cents) everywhere inside paysentinel; providers
that speak decimal strings ("99.90") are converted at the adapter.
"""

from __future__ import annotations

from datetime import date, datetime
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


# --- Checkout API -------------------------------------------------------------------


def no_control_characters(value: object) -> object:
    """Text a person typed: NUL and other control characters (tab and line breaks
    aside) are refused, so they never reach the database, the provider or a bill."""
    if isinstance(value, str):
        bad = next((c for c in value if (ord(c) < 32 and c not in "\t\n\r") or 127 <= ord(c) < 160), None)
        if bad is not None:
            raise ValueError(f"must not contain control characters (found U+{ord(bad):04X})")
    return value


class Customer(BaseModel):
    model_config = ConfigDict(extra="forbid")
    email: Optional[EmailStr] = None
    phone: Optional[str] = Field(None, pattern=r"^\+?[0-9 \-]{5,20}$")

    @field_validator("email", "phone", mode="before")
    @classmethod
    def _no_control_characters(cls, value: object) -> object:
        return no_control_characters(value)


class CheckoutRequest(BaseModel):
    """What the checkout service sends to start a payment."""

    model_config = ConfigDict(extra="forbid")

    order_id: str = Field(..., pattern=ORDER_ID_PATTERN, description="Merchant order number")
    amount_minor: int = Field(..., gt=0, le=10**12, description="Amount in minor units (fen, cents)")
    currency: str = Field("CNY", description="ISO 4217 code")
    provider: str = Field("simulator", description="Payment provider adapter")
    subject: str = Field("", max_length=128, description="What the customer pays for")
    customer: Customer = Field(default_factory=Customer)
    notify_url: Optional[str] = Field(
        None, max_length=2048, description="Merchant URL that receives a signed notification for every outcome"
    )
    client_ip: Optional[str] = Field(None, max_length=45, description="Payer's IP, for risk rules")
    device_id: Optional[str] = Field(None, max_length=128, description="Payer's device, for risk rules")
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

    @field_validator("order_id", "currency", "provider", "subject", "notify_url", "client_ip", "device_id", mode="before")
    @classmethod
    def _no_control_characters(cls, value: object) -> object:
        return no_control_characters(value)


class RefundCreate(BaseModel):
    """A merchant-initiated refund (``POST /payments/{id}/refunds``)."""

    model_config = ConfigDict(extra="forbid")
    amount_minor: int = Field(..., gt=0, le=10**12)
    reason: str = Field(..., min_length=1, max_length=256)


class RefundView(BaseModel):
    refund_id: str  # also the provider's out_request_no
    trade_no: str
    amount_minor: int
    status: RefundStatus
    reason: str
    requested_by: str
    detail: Optional[str] = None


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
    review_id: Optional[str] = None
    captured_minor: int = 0
    refunded_minor: int = 0
    expires_at: Optional[datetime] = None
    refunds: list[RefundView] = Field(default_factory=list)
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


class RefundCommand(BaseModel):
    """The ``refund`` update: a refund asked for by the merchant (idempotent by ``key``)."""

    key: str = Field(..., pattern=r"^[A-Za-z0-9_\-]{1,24}$")
    amount_minor: int = Field(..., gt=0)
    reason: str = Field(..., min_length=1, max_length=256)
    requested_by: str = "merchant"


class RefundInput(BaseModel):
    """RefundWorkflow's input: one refund of one paid trade."""

    payment_id: str
    provider: str
    order_id: str
    trade_no: str
    refund_id: str
    amount_minor: int
    currency: str
    reason: str
    requested_by: str
    timing: PaymentTiming


class ReviewDecision(BaseModel):
    """The ``decide`` update on a review: what an operator decided and why."""

    action: ReviewAction
    reason: str = Field(..., min_length=3, max_length=500)
    operator: str = Field(..., min_length=1, max_length=64)


class ReviewInput(BaseModel):
    review_id: str
    payment_id: str
    order_id: str
    reason: ReviewReason
    evidence: str
    amount_minor: int
    currency: str
    captured_minor: int
    escalate_after_seconds: float
    deadline_seconds: float


class ReviewOutcome(BaseModel):
    review_id: str
    action: ReviewAction
    operator: str
    reason: str
    by_deadline: bool = False


class ReviewView(BaseModel):
    review_id: str
    payment_id: str
    order_id: str
    reason: ReviewReason
    evidence: str
    status: Literal["OPEN", "ESCALATED", "DECIDED"]
    allowed_actions: list[ReviewAction]
    default_action: ReviewAction
    deadline_at: Optional[datetime] = None
    decision: Optional[ReviewOutcome] = None


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


class ProviderRefund(BaseModel):
    """The provider's view of a refund."""

    refund_id: str
    trade_no: str
    amount_minor: int
    status: RefundStatus
    fail_reason: Optional[str] = None


class RefundRecord(BaseModel):
    refund_id: str
    payment_id: str
    order_id: str
    trade_no: str
    amount_minor: int
    currency: str
    status: RefundStatus
    reason: str
    requested_by: str
    submissions: int = 0
    detail: Optional[str] = None


class NotificationInput(BaseModel):
    """One outcome to tell the customer and the merchant; ``key`` makes it once per event."""

    key: str
    payment_id: str
    order_id: str
    kind: NotifyKind
    amount_minor: int
    currency: str
    detail: str
    email: Optional[str] = None
    webhook_url: Optional[str] = None


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


# --- The monitor (alerting without Prometheus) -----------------------------------------


class MonitorInput(BaseModel):
    """One look at the last ``window_seconds``: rates against thresholds."""

    name: str = "default"  # incidents are tracked per monitor name
    window_seconds: float = Field(900.0, gt=0)
    failure_threshold: float = Field(0.05, ge=0, le=1)  # FAILED / finished payments
    timeout_threshold: float = Field(0.30, ge=0, le=1)  # CLOSED (unpaid) / finished payments
    min_payments: int = Field(20, ge=1)  # fewer finished payments than this never alert


class WindowFigures(BaseModel):
    finished: int
    succeeded: int
    failed: int
    closed: int
    pending: int
    stuck: int
    open_reviews: int

    @property
    def failure_rate(self) -> float:
        return self.failed / self.finished if self.finished else 0.0

    @property
    def timeout_rate(self) -> float:
        return self.closed / self.finished if self.finished else 0.0


STUCK_KINDS = ("open_past_ttl", "refunding_without_child", "review_without_child", "refund_processing_too_long")


class StuckMoney(BaseModel):
    """Money that should be moving and is not: how many of each kind, and which payments."""

    counts: dict[str, int]  # kind (STUCK_KINDS) -> payments (refunds for refund_processing_too_long)
    payments: dict[str, list[str]]  # kind -> payment ids, oldest first (at most a few)
    refunds: list[str] = []  # the refunds PROCESSING too long, as "refund id (payment id)", at most a few

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def describe(self, most: int = 10) -> str:
        """One line naming at most ``most`` payments, e.g. "2 stuck: refunding without a
        running refund workflow 1 (payment-a); ..." (empty when nothing is stuck)."""
        parts, named = [], 0
        for kind in STUCK_KINDS:
            count = self.counts.get(kind, 0)
            if not count:
                continue
            names = self.refunds if kind == "refund_processing_too_long" else self.payments.get(kind, [])
            shown = names[: max(0, most - named)]
            named += len(shown)
            more = count - len(shown)
            listed = ", ".join(shown) + ((" and " if shown else "") + f"{more} more" if more else "")
            parts.append(f"{STUCK_DESCRIPTIONS[kind]}: {count} ({listed})")
        return f"{self.total} stuck: " + "; ".join(parts) if parts else "nothing stuck"


STUCK_DESCRIPTIONS = {
    "open_past_ttl": "CREATED or PENDING past their time to live",
    "refunding_without_child": "REFUNDING without a running RefundWorkflow",
    "review_without_child": "IN_REVIEW without a running ManualReviewWorkflow",
    "refund_processing_too_long": "refunds PROCESSING longer than the provider's limit",
}


class IncidentInput(BaseModel):
    monitor: str
    kind: str  # failure_rate, timeout_rate
    breach: bool
    rate: float
    threshold: float
    payments: int
    detail: str


class Incident(BaseModel):
    """The incident a monitor run concerns, and whether its news still has to be sent."""

    id: int
    monitor: str
    kind: str
    status: str  # OPEN, RESOLVED
    rate: float
    peak_rate: float
    threshold: float
    payments: int
    detail: str
    opened_at: datetime
    resolved_at: Optional[datetime] = None
    to_send: bool = False  # the alert (OPEN) or the all-clear (RESOLVED) has not been sent yet

    @property
    def key(self) -> str:
        return f"alert-{self.id}-{self.status.lower()}"


# --- Reconciliation ---------------------------------------------------------------------


class ReconcileInput(BaseModel):
    """One provider's settlement for one day (or, without ``day``, the scheduled run:
    yesterday plus every earlier day of the catch-up window without a finished run)."""

    provider: str = "simulator"
    day: Optional[date] = None
    catchup_days: int = Field(7, ge=0, le=366)
    batch_rows: int = Field(5000, ge=10, le=100_000)
    alert_threshold: int = Field(0, ge=0)
    # How long a run waits for its repairs to show in our books before it reports.
    verify_wait_seconds: float = Field(900.0, ge=0)
    # Where a continued-as-new run picks up.
    stage: str = "load"  # load, classify, missing, repair, finish
    cursor: int = 0

    @property
    def run_id(self) -> str:
        return f"{self.provider}:{self.day}"


class ReconcileStep(BaseModel):
    provider: str
    day: date
    after: int = 0  # the last row (or discrepancy) id handled
    limit: int = 5000


class RunFailure(BaseModel):
    provider: str
    day: date
    error: str


class StepResult(BaseModel):
    last: int  # the last id handled; the next step starts after it
    handled: int
    done: bool


class SettlementFinding(BaseModel):
    """A difference the reconciliation sends to a payment's workflow (the ``settlement`` signal)."""

    kind: str  # open_payment, paid_during_review, closed_order_paid, duplicate_charge, amount_differs,
    # missing_at_provider
    day: date
    order_id: str
    trade_no: str
    amount_minor: int
    currency: str
    paid_at: Optional[datetime] = None
    detail: str = ""


class ReconcileReport(BaseModel):
    run_id: str
    provider: str
    day: date
    status: str
    rows: int
    matched: int
    day_boundary: int
    classes: dict[str, dict[str, int]]  # kind -> {"count", "amount_minor", "unresolved"}
    unresolved: int
    passes: int
    started_at: datetime
    finished_at: Optional[datetime] = None
    error: Optional[str] = None  # why the run failed (status FAILED)
