"""Every model that crosses a boundary (HTTP, workflow, activity, signal, update).

Amounts are integer minor units (fen, cents) everywhere inside paysentinel; providers
that speak decimal strings ("99.90") are converted at the adapter.

The models live in modules by concern; every name is importable from here:

- ``common``: statuses, review reasons and actions, notification kinds, currency amounts
- ``checkout``: the checkout API (requests, the payment view)
- ``payment``: the payment workflow's input and state, callbacks, trade and record activities
- ``refunds``: refunds and manual reviews
- ``monitor``: notifications, the monitor's figures, stuck money and incidents
- ``reconcile``: reconciliation runs and their reports
"""

from paysentinel.models.common import (
    ORDER_ID_PATTERN,
    CURRENCY_EXPONENTS,
    PaymentStatus,
    FINAL_STATUSES,
    ReviewReason,
    ReviewAction,
    REVIEW_ACTIONS,
    NotifyKind,
    RefundStatus,
    TradeStatus,
    to_major,
    to_minor,
)
from paysentinel.models.checkout import (
    no_control_characters,
    Customer,
    CheckoutRequest,
    RefundCreate,
    RefundView,
    TimelineEntry,
    PaymentView,
)
from paysentinel.models.payment import (
    PaymentTiming,
    PaymentState,
    OrderCustomer,
    PaymentOrder,
    PaymentInput,
    ProviderCallback,
    CreateTradeInput,
    TradeRef,
    Trade,
    RiskCheckInput,
    RiskVerdict,
    PaymentRecord,
    RecordPaymentInput,
    CallbackOutcome,
)
from paysentinel.models.refunds import (
    RefundCommand,
    RefundInput,
    ReviewDecision,
    ReviewInput,
    ReviewOutcome,
    ReviewView,
    ProviderRefund,
    RefundRecord,
)
from paysentinel.models.monitor import (
    NotificationInput,
    MonitorInput,
    WindowFigures,
    STUCK_KINDS,
    StuckMoney,
    STUCK_DESCRIPTIONS,
    IncidentInput,
    Incident,
)
from paysentinel.models.reconcile import (
    ReconcileInput,
    ReconcileStep,
    RunFailure,
    StepResult,
    SettlementFinding,
    ReconcileReport,
)

__all__ = [
    "ORDER_ID_PATTERN",
    "CURRENCY_EXPONENTS",
    "PaymentStatus",
    "FINAL_STATUSES",
    "ReviewReason",
    "ReviewAction",
    "REVIEW_ACTIONS",
    "NotifyKind",
    "RefundStatus",
    "TradeStatus",
    "to_major",
    "to_minor",
    "no_control_characters",
    "Customer",
    "CheckoutRequest",
    "RefundCreate",
    "RefundView",
    "TimelineEntry",
    "PaymentView",
    "PaymentTiming",
    "PaymentState",
    "OrderCustomer",
    "PaymentOrder",
    "PaymentInput",
    "ProviderCallback",
    "CreateTradeInput",
    "TradeRef",
    "Trade",
    "RiskCheckInput",
    "RiskVerdict",
    "PaymentRecord",
    "RecordPaymentInput",
    "CallbackOutcome",
    "RefundCommand",
    "RefundInput",
    "ReviewDecision",
    "ReviewInput",
    "ReviewOutcome",
    "ReviewView",
    "ProviderRefund",
    "RefundRecord",
    "NotificationInput",
    "MonitorInput",
    "WindowFigures",
    "STUCK_KINDS",
    "StuckMoney",
    "STUCK_DESCRIPTIONS",
    "IncidentInput",
    "Incident",
    "ReconcileInput",
    "ReconcileStep",
    "RunFailure",
    "StepResult",
    "SettlementFinding",
    "ReconcileReport",
]
