"""Operator API: reviews and decisions, behind bearer tokens (PAYSENTINEL_OPERATOR_TOKENS).

GET  /operator/reviews?status=open          reviews, newest first
GET  /operator/reviews/{review_id}          one review: reason, evidence, possible actions
POST /operator/reviews/{review_id}/decision {"action", "reason"}: approve, reject, refund, mark_paid

A decision is a Temporal update on the review's workflow; its validator refuses actions
that make no sense for the review (409 with the reason), and the history records who
decided what and why.
"""

from __future__ import annotations

import hmac
from typing import Literal, Optional

from fastapi import APIRouter, Depends, HTTPException, Query
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field
from sqlalchemy import select
from temporalio.client import WorkflowUpdateFailedError
from temporalio.service import RPCError

from paysentinel import db
from paysentinel.models import REVIEW_ACTIONS, ReviewAction, ReviewDecision, ReviewOutcome, ReviewReason, ReviewView
from starters.common import Resources, resources, update_error
from workflows.review import ManualReviewWorkflow

router = APIRouter(prefix="/operator", tags=["operator"])
bearer = HTTPBearer(auto_error=False)


def operator(
    credentials: Optional[HTTPAuthorizationCredentials] = Depends(bearer), res: Resources = Depends(resources)
) -> str:
    """The operator's name for a valid bearer token; 401 otherwise."""
    given = credentials.credentials.encode() if credentials else b""
    name = None
    for token, who in res.settings.operators.items():
        if hmac.compare_digest(given, token.encode()):  # every token compared: constant time
            name = who
    if name is None:
        raise HTTPException(401, "operator token missing or invalid: send 'Authorization: Bearer <token>'",
                            headers={"WWW-Authenticate": "Bearer"})
    return name


class DecisionBody(BaseModel):
    action: ReviewAction
    reason: str = Field(..., min_length=3, max_length=500, description="Why: recorded with the decision")


def _view(row: db.Review) -> ReviewView:
    reason = ReviewReason(row.reason)
    decision = None
    if row.action:
        decision = ReviewOutcome(review_id=row.review_id, action=ReviewAction(row.action),
                                 operator=row.decided_by or "", reason=row.decision_reason or "")
    return ReviewView(
        review_id=row.review_id, payment_id=row.payment_id, order_id=row.order_id, reason=reason,
        evidence=row.evidence, status=row.status, allowed_actions=REVIEW_ACTIONS[reason][0],
        default_action=ReviewAction(row.default_action), deadline_at=row.deadline_at, decision=decision,
    )


async def _row(res: Resources, review_id: str) -> db.Review:
    async with res.sessions() as session:
        row = await session.get(db.Review, review_id)
    if row is None:
        raise HTTPException(404, f"no review {review_id!r}; list them with GET /operator/reviews")
    return row


@router.get("/reviews", response_model=list[ReviewView])
async def list_reviews(
    status: Literal["open", "decided", "all"] = "open",
    order_id: Optional[str] = None,
    limit: int = Query(100, ge=1, le=1000),
    _: str = Depends(operator),
    res: Resources = Depends(resources),
) -> list[ReviewView]:
    query = select(db.Review).order_by(db.Review.created_at.desc()).limit(limit)
    if status == "open":
        query = query.where(db.Review.status.in_(["OPEN", "ESCALATED"]))
    elif status == "decided":
        query = query.where(db.Review.status == "DECIDED")
    if order_id:
        query = query.where(db.Review.order_id == order_id)
    async with res.sessions() as session:
        return [_view(row) for row in (await session.scalars(query)).all()]


@router.get("/reviews/{review_id}", response_model=ReviewView)
async def get_review(review_id: str, _: str = Depends(operator), res: Resources = Depends(resources)) -> ReviewView:
    return _view(await _row(res, review_id))


@router.post("/reviews/{review_id}/decision", response_model=ReviewOutcome)
async def decide(
    review_id: str, body: DecisionBody, who: str = Depends(operator), res: Resources = Depends(resources)
) -> ReviewOutcome:
    if (row := await _row(res, review_id)).status == "DECIDED":
        raise HTTPException(409, _already_decided(row))
    decision = ReviewDecision(action=body.action, reason=body.reason, operator=who)
    try:
        return await res.client.get_workflow_handle(review_id).execute_update(ManualReviewWorkflow.decide, decision)
    except (WorkflowUpdateFailedError, RPCError) as err:
        if (row := await _row(res, review_id)).status == "DECIDED":  # decided (and closed) meanwhile
            raise HTTPException(409, _already_decided(row)) from err
        raise update_error(err, f"review {review_id}") from err


def _already_decided(row: db.Review) -> str:
    return f"review {row.review_id} is already decided: {row.action} by {row.decided_by} ({row.decision_reason})"
