"""Operator API: reviews and decisions, behind bearer tokens (PAYSENTINEL_OPERATOR_TOKENS).

GET  /operator/reviews?status=open          reviews, newest first
GET  /operator/reviews/{review_id}          one review: reason, evidence, possible actions
POST /operator/reviews/{review_id}/decision {"action", "reason"}: approve, reject, refund, mark_paid
GET  /operator/reconciliations              reconciliation reports, newest day first
GET  /operator/reconciliations/{day}        one day's report and every difference with its resolution
POST /operator/reconciliations/{day}        reconcile a day now (idempotent)

A decision is a Temporal update on the review's workflow; its validator refuses actions
that make no sense for the review (409 with the reason), and the history records who
decided what and why.
"""

from __future__ import annotations

import hmac
from datetime import date, datetime
from typing import Literal, Optional
from zoneinfo import ZoneInfo

from fastapi import APIRouter, Depends, HTTPException, Query
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field
from sqlalchemy import func, select
from temporalio.client import WorkflowExecutionStatus, WorkflowUpdateFailedError
from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from temporalio.service import RPCError

from paysentinel import db
from activities.reconcile import report_of, run_id
from paysentinel.models import (
    REVIEW_ACTIONS,
    ReconcileReport,
    ReviewAction,
    ReviewDecision,
    ReviewOutcome,
    ReviewReason,
    ReviewView,
)
from starters.common import Resources, resources, update_error
from workflows.reconcile import ReconciliationWorkflow, reconcile_input, reconcile_workflow_id
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


# --- Reconciliation (finance) -----------------------------------------------------------


class DiscrepancyView(BaseModel):
    kind: str
    order_id: str
    trade_no: str
    refund_no: str
    provider_amount_minor: Optional[int]
    our_amount_minor: Optional[int]
    currency: str
    detail: str
    resolution: Optional[str]
    resolved: bool


class ReconciliationView(BaseModel):
    report: ReconcileReport
    bill_rows_loaded: int  # progress while the run loads the bill
    discrepancies: list[DiscrepancyView]


def _day(day: date, res: Resources) -> date:
    today = datetime.now(ZoneInfo(res.settings.settlement_timezone)).date()
    if day > today:
        raise HTTPException(422, f"{day} has not started yet in {res.settings.settlement_timezone}; "
                                 f"reconcile {today} or an earlier day")
    return day


@router.get("/reconciliations", response_model=list[ReconcileReport])
async def list_reconciliations(
    limit: int = Query(30, ge=1, le=366), _: str = Depends(operator), res: Resources = Depends(resources)
) -> list[ReconcileReport]:
    async with res.sessions() as session:
        runs = (await session.scalars(
            select(db.ReconciliationRun).order_by(db.ReconciliationRun.bill_date.desc()).limit(limit))).all()
    return [report_of(run) for run in runs]


@router.get("/reconciliations/{day}", response_model=ReconciliationView)
async def get_reconciliation(
    day: date, provider: str = "simulator", _: str = Depends(operator), res: Resources = Depends(resources)
) -> ReconciliationView:
    rid = run_id(provider, day)
    async with res.sessions() as session:
        run = await session.get(db.ReconciliationRun, rid)
        if run is None:
            raise HTTPException(404, f"{day} ({provider}) has not been reconciled; "
                                     f"start it with `paysentinel reconcile run --date {day}`")
        loaded = await session.scalar(select(func.count()).where(
            db.SettlementRowRecord.provider == provider, db.SettlementRowRecord.bill_date == day.isoformat()))
        items = (await session.scalars(
            select(db.Discrepancy).where(db.Discrepancy.run_id == rid).order_by(db.Discrepancy.id))).all()
    return ReconciliationView(
        report=report_of(run), bill_rows_loaded=loaded or 0,
        discrepancies=[DiscrepancyView.model_validate(item, from_attributes=True) for item in items],
    )


@router.post("/reconciliations/{day}", status_code=202)
async def start_reconciliation(
    day: date, provider: str = "simulator", who: str = Depends(operator), res: Resources = Depends(resources)
) -> dict[str, str]:
    """Reconcile a day now (again, if it was reconciled before: nothing is repaired twice)."""
    if provider not in res.providers:
        raise HTTPException(422, f"unknown provider {provider!r}; configured: {', '.join(res.providers)}")
    _day(day, res)
    workflow_id = reconcile_workflow_id(provider, day)
    try:
        running = (await res.client.get_workflow_handle(workflow_id).describe()).status
    except RPCError:
        running = None  # never run before
    if running == WorkflowExecutionStatus.RUNNING:
        raise HTTPException(409, f"a reconciliation of {day} is still running ({workflow_id}); run the day again "
                                 "once it has finished")
    await res.client.start_workflow(
        ReconciliationWorkflow.run, reconcile_input(res.settings, provider).model_copy(update={"day": day}),
        id=workflow_id, task_queue=res.settings.task_queue,
        id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
        id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE,
        static_summary=f"Reconcile {provider} {day} (started by {who})",
    )
    return {"workflow_id": workflow_id, "day": day.isoformat(), "provider": provider}
