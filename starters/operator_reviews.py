"""Operator routes for manual reviews: list, read, and decide (a Temporal update on the review's
workflow; four eyes above PAYSENTINEL_FOUR_EYES_MINOR). See starters/operator_api.py."""

import logging
from datetime import datetime
from typing import Literal, Optional

from fastapi import APIRouter, Depends, HTTPException, Query
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from temporalio.client import WorkflowUpdateFailedError
from temporalio.service import RPCError

from paysentinel import db
from paysentinel.models import (
    REVIEW_ACTIONS,
    ReviewAction,
    ReviewDecision,
    ReviewOutcome,
    ReviewReason,
    ReviewView,
    to_major,
)
from starters.common import Resources, resources, update_error
from starters.operator_auth import Operator, audit, operator, refuse_role
from workflows.review import ManualReviewWorkflow

log = logging.getLogger("paysentinel.operator")
router = APIRouter(prefix="/operator", tags=["operator"])


class DecisionBody(BaseModel):
    action: ReviewAction
    reason: str = Field(..., min_length=3, max_length=500, description="Why: recorded with the decision")


class PendingView(BaseModel):
    """A decision above the four-eyes amount, waiting for a second, different approver."""

    action: ReviewAction
    operator: str
    reason: str
    amount_minor: int
    currency: str
    created_at: datetime


class OperatorReviewView(ReviewView):
    pending_decision: Optional[PendingView] = None


def _view(row: db.Review, pending: Optional[db.PendingDecision] = None) -> OperatorReviewView:
    reason = ReviewReason(row.reason)
    decision = None
    if row.action:
        decision = ReviewOutcome(
            review_id=row.review_id,
            action=ReviewAction(row.action),
            operator=row.decided_by or "",
            reason=row.decision_reason or "",
        )
    waiting = None
    if pending is not None and row.status != "DECIDED":
        waiting = PendingView.model_validate(pending, from_attributes=True)
    return OperatorReviewView(
        review_id=row.review_id,
        payment_id=row.payment_id,
        order_id=row.order_id,
        reason=reason,
        evidence=row.evidence,
        status=row.status,
        allowed_actions=REVIEW_ACTIONS[reason][0],
        default_action=ReviewAction(row.default_action),
        deadline_at=row.deadline_at,
        decision=decision,
        pending_decision=waiting,
    )


async def _row(res: Resources, review_id: str) -> db.Review:
    async with res.sessions() as session:
        row = await session.get(db.Review, review_id)
    if row is None:
        raise HTTPException(404, f"no review {review_id!r}; list them with GET /operator/reviews")
    return row


async def _pending(res: Resources, review_ids: list[str]) -> dict[str, db.PendingDecision]:
    if not review_ids:
        return {}
    async with res.sessions() as session:
        rows = (await session.scalars(select(db.PendingDecision).where(db.PendingDecision.review_id.in_(review_ids)))).all()
    return {row.review_id: row for row in rows}


@router.get("/reviews", response_model=list[OperatorReviewView])
async def list_reviews(
    status: Literal["open", "decided", "all"] = "open",
    order_id: Optional[str] = None,
    limit: int = Query(100, ge=1, le=1000),
    _: Operator = Depends(operator),
    res: Resources = Depends(resources),
) -> list[OperatorReviewView]:
    query = select(db.Review).order_by(db.Review.created_at.desc()).limit(limit)
    if status == "open":
        query = query.where(db.Review.status.in_(["OPEN", "ESCALATED"]))
    elif status == "decided":
        query = query.where(db.Review.status == "DECIDED")
    if order_id:
        query = query.where(db.Review.order_id == order_id)
    async with res.sessions() as session:
        rows = (await session.scalars(query)).all()
    pending = await _pending(res, [row.review_id for row in rows])
    return [_view(row, pending.get(row.review_id)) for row in rows]


@router.get("/reviews/{review_id}", response_model=OperatorReviewView)
async def get_review(review_id: str, _: Operator = Depends(operator), res: Resources = Depends(resources)) -> OperatorReviewView:
    row = await _row(res, review_id)
    return _view(row, (await _pending(res, [review_id])).get(review_id))


@router.post(
    "/reviews/{review_id}/decision",
    response_model=ReviewOutcome,
    responses={202: {"description": "recorded, pending a second approval by an approver"}},
)
async def decide(review_id: str, body: DecisionBody, who: Operator = Depends(operator), res: Resources = Depends(resources)):
    """Decide a review (operator and above). Above the four-eyes amount the first decision is
    only recorded (202); a second, different approver deciding the same completes it."""
    try:
        answer, result, detail = await _decide(res, who, review_id, body)
    except HTTPException as err:
        await audit(
            res, who, f"review.{body.action.value}", review_id, body.reason, "refused", f"{err.status_code}: {err.detail}"
        )
        raise
    await audit(res, who, f"review.{body.action.value}", review_id, body.reason, result, detail)
    return answer


async def _decide(res: Resources, who: Operator, review_id: str, body: DecisionBody):
    if not who.may("operator"):
        raise refuse_role(who, "operator", "decide reviews")
    if (row := await _row(res, review_id)).status == "DECIDED":
        raise HTTPException(409, _already_decided(row))
    amount, currency = await _at_stake(res, row, body.action)
    threshold = res.settings.four_eyes_minor
    if amount <= threshold:
        outcome = await _execute(res, review_id, ReviewDecision(action=body.action, reason=body.reason, operator=who.name))
        return outcome, "done", f"{body.action.value} ({to_major(amount, currency)} {currency} at stake)"
    money = f"{to_major(amount, currency)} {currency}"
    allowed = REVIEW_ACTIONS[ReviewReason(row.reason)][0]
    if body.action not in allowed:  # what the workflow's validator would say, before anything is recorded
        raise HTTPException(
            409,
            f"'{body.action.value}' is not possible for a {row.reason} review; possible: {', '.join(a.value for a in allowed)}",
        )
    pending = (await _pending(res, [review_id])).get(review_id)
    if pending is None:
        try:
            async with res.sessions() as session, session.begin():
                session.add(
                    db.PendingDecision(
                        review_id=review_id,
                        action=body.action.value,
                        reason=body.reason,
                        operator=who.name,
                        role=who.role,
                        amount_minor=amount,
                        currency=currency,
                    )
                )
        except IntegrityError as err:
            raise HTTPException(
                409,
                f"another decision on {review_id} was recorded at the same moment; look at it: GET /operator/reviews/{review_id}",
            ) from err
        message = (
            f"{body.action.value} of {review_id} ({money}, above the four-eyes amount of "
            f"{to_major(threshold, currency)}) recorded by {who.name}, pending a second approval by an "
            f"approver"
        )
        return (
            JSONResponse(
                status_code=202,
                content={
                    "status": "pending",
                    "review_id": review_id,
                    "action": body.action.value,
                    "operator": who.name,
                    "amount_minor": amount,
                    "currency": currency,
                    "message": message,
                },
            ),
            "pending",
            message,
        )
    if pending.operator == who.name:
        raise HTTPException(
            409,
            f"{who.name} already decided {pending.action} on {review_id} ({money}); "
            "it needs a second approval by a different approver",
        )
    if not who.may("approver"):
        raise refuse_role(who, "approver", f"give the second approval of {pending.operator}'s {pending.action}")
    if pending.action != body.action.value:
        raise HTTPException(
            409,
            f"{review_id} has {pending.action} by {pending.operator} pending a second "
            f"approval; approve that action ({pending.action}) or let it be",
        )
    both = f"{pending.operator}+{who.name}"[:64]
    reason = f"{pending.reason} (second approval by {who.name}: {body.reason})"
    if len(reason) > 500:
        reason = reason[:497] + "..."
    outcome = await _execute(res, review_id, ReviewDecision(action=body.action, reason=reason, operator=both))
    async with res.sessions() as session, session.begin():
        await session.delete(await session.get(db.PendingDecision, review_id))
    return outcome, "done", f"second approval of {pending.operator}'s {pending.action} ({money})"


async def _at_stake(res: Resources, row: db.Review, action: ReviewAction) -> tuple[int, str]:
    """The money a decision moves: what was taken (refund, reject: what is still refundable;
    approve: what was captured) or, for mark_paid, the payment's amount."""
    async with res.sessions() as session:
        payment = await session.get(db.Payment, row.payment_id)
    if payment is None:
        return 0, "CNY"
    captured = payment.paid_amount_minor or 0
    if action is ReviewAction.MARK_PAID:
        return payment.amount_minor, payment.currency
    if action is ReviewAction.APPROVE:
        return captured, payment.currency
    return max(captured - (payment.refunded_minor or 0), 0), payment.currency


async def _execute(res: Resources, review_id: str, decision: ReviewDecision) -> ReviewOutcome:
    try:
        return await res.client.get_workflow_handle(review_id).execute_update(ManualReviewWorkflow.decide, decision)
    except (WorkflowUpdateFailedError, RPCError) as err:
        if (row := await _row(res, review_id)).status == "DECIDED":  # decided (and closed) meanwhile
            raise HTTPException(409, _already_decided(row)) from err
        raise update_error(err, f"review {review_id}") from err


def _already_decided(row: db.Review) -> str:
    return f"review {row.review_id} is already decided: {row.action} by {row.decided_by} ({row.decision_reason})"
