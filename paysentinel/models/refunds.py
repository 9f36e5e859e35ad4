"""Refunds and manual reviews: the refund update, the refund and review workflows' inputs,
an operator's decision, and the refund as the provider and our database see it."""

from __future__ import annotations

from datetime import datetime
from typing import Literal, Optional

from pydantic import BaseModel, Field

from paysentinel.models.common import RefundStatus, ReviewAction, ReviewReason
from paysentinel.models.payment import PaymentTiming


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
