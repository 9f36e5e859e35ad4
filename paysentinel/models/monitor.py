"""Notifications to the customer and the merchant, and the monitor's models: the figures of a
window, money that is stuck, and incidents."""

from __future__ import annotations

from datetime import datetime
from typing import Optional

from pydantic import BaseModel, Field

from paysentinel.models.common import NotifyKind


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
