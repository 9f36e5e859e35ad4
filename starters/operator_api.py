"""Operator API: its own listener (PAYSENTINEL_OPERATOR_PORT, 8004), never the public checkout port.

GET  /operator/reviews?status=open          reviews, newest first                     viewer
GET  /operator/reviews/{review_id}          one review: reason, evidence, possible actions  viewer
POST /operator/reviews/{review_id}/decision {"action", "reason"}: approve, reject, refund, mark_paid  operator
GET  /operator/payments/{payment_id}        a payment: status, money, refunds, timeline  viewer
GET  /operator/reconciliations              reconciliation reports, newest day first  viewer
GET  /operator/reconciliations/{day}        one day's report and every difference      viewer
POST /operator/reconciliations/{day}        reconcile a day now (idempotent)           operator
GET  /operator/audit?operator=&since=       every operator action, newest first        viewer

Operators are configured as ``name:role:sha256-hex-of-token`` (PAYSENTINEL_OPERATOR_TOKENS);
a bearer token is hashed and compared, in constant time, with every configured hash. Roles:
viewer (reads), operator (also decides reviews, runs reconciliation), approver (also gives
the second approval). 401 without a valid token, 403 for a role that may not do the action.

A decision is a Temporal update on the review's workflow; its validator refuses actions
that make no sense for the review (409 with the reason), and the history records who
decided what and why. Four eyes: a decision that moves more than PAYSENTINEL_FOUR_EYES_MINOR
is only recorded (202, pending) until a second, different approver decides the same; the
update runs then, under both names. Every action (and every refusal) is appended to the
``audit`` table.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
from dataclasses import dataclass
from datetime import date, datetime, timezone
from typing import Literal, Optional
from zoneinfo import ZoneInfo

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from temporalio.client import WorkflowExecutionStatus, WorkflowUpdateFailedError
from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from temporalio.service import RPCError

from paysentinel import db
from activities.reconcile import report_of, run_id
from paysentinel.config import OPERATOR_ROLES, Settings
from paysentinel.models import (
    REVIEW_ACTIONS,
    PaymentView,
    ReconcileReport,
    ReviewAction,
    ReviewDecision,
    ReviewOutcome,
    ReviewReason,
    ReviewView,
    to_major,
)
from starters.common import (
    Resources,
    add_metrics,
    error_body,
    lifespan_for,
    readable_validation_error,
    resources,
    update_error,
)
from workflows.payment import PaymentWorkflow
from workflows.reconcile import ReconciliationWorkflow, reconcile_input, reconcile_workflow_id
from workflows.review import ManualReviewWorkflow

log = logging.getLogger("paysentinel.operator")
router = APIRouter(prefix="/operator", tags=["operator"])
bearer = HTTPBearer(auto_error=False)
RANK = {role: rank for rank, role in enumerate(OPERATOR_ROLES)}


@dataclass(frozen=True)
class Operator:
    """Who is calling: the configured name and role, and the address the request came from."""

    name: str
    role: str
    address: str

    def may(self, role: str) -> bool:
        return RANK[self.role] >= RANK[role]


def operator(
    request: Request,
    credentials: Optional[HTTPAuthorizationCredentials] = Depends(bearer),
    res: Resources = Depends(resources),
) -> Operator:
    """The operator of a valid bearer token (any role: viewer and above); 401 otherwise."""
    given = hashlib.sha256(credentials.credentials.encode()).digest() if credentials else b""
    found = None
    for name, role, digest in res.settings.operators:
        if hmac.compare_digest(given, digest):  # every hash compared: constant time
            found = (name, role)
    if found is None:
        raise HTTPException(
            401, "operator token missing or invalid: send 'Authorization: Bearer <token>'", headers={"WWW-Authenticate": "Bearer"}
        )
    return Operator(found[0], found[1], request.client.host if request.client else "")


def refuse_role(who: Operator, needed: str, what: str) -> HTTPException:
    article = "an" if needed[0] in "aeiou" else "a"
    return HTTPException(403, f"{who.role} {who.name} may not {what}; ask {article} {needed}")


async def audit(res: Resources, who: Operator, action: str, target: str, reason: str, result: str, detail: str) -> None:
    await db.record_audit(
        res.sessions,
        operator=who.name,
        role=who.role,
        address=who.address,
        action=action,
        target=target,
        reason=reason,
        result=result,
        detail=detail[:2000],
    )


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


# --- Payments (read) ----------------------------------------------------------------------


@router.get("/payments/{payment_id}", response_model=PaymentView)
async def get_payment(payment_id: str, _: Operator = Depends(operator), res: Resources = Depends(resources)) -> PaymentView:
    from starters.checkout_api import view_from_row

    async with res.sessions() as session:
        row = await session.get(db.Payment, payment_id)
    if row is None:
        raise HTTPException(404, f"no payment {payment_id!r}; payment ids look like 'payment-<order id>'")
    try:
        return await asyncio.wait_for(res.client.get_workflow_handle(payment_id).query(PaymentWorkflow.view), 5)
    except Exception as err:  # timeout, worker down, query failed: the row alone is still correct
        log.info("payment %s: answering from the database (%s)", payment_id, err)
        return view_from_row(row)


# --- Audit ---------------------------------------------------------------------------------


class AuditView(BaseModel):
    id: int
    at: datetime
    operator: str
    role: str
    address: str
    action: str
    target: str
    reason: str
    result: Literal["done", "pending", "refused"]
    detail: str


@router.get("/audit", response_model=list[AuditView])
async def list_audit(
    operator_name: Optional[str] = Query(None, alias="operator"),
    since: Optional[datetime] = None,
    limit: int = Query(200, ge=1, le=5000),
    _: Operator = Depends(operator),
    res: Resources = Depends(resources),
) -> list[AuditView]:
    """Operator actions, newest first (viewer and above)."""
    query = select(db.AuditEntry).order_by(db.AuditEntry.id.desc()).limit(limit)
    if operator_name:
        query = query.where(db.AuditEntry.operator == operator_name)
    if since is not None:
        query = query.where(db.AuditEntry.at >= (since if since.tzinfo else since.replace(tzinfo=timezone.utc)))
    async with res.sessions() as session:
        return [AuditView.model_validate(row, from_attributes=True) for row in (await session.scalars(query)).all()]


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
        raise HTTPException(
            422, f"{day} has not started yet in {res.settings.settlement_timezone}; reconcile {today} or an earlier day"
        )
    return day


@router.get("/reconciliations", response_model=list[ReconcileReport])
async def list_reconciliations(
    limit: int = Query(30, ge=1, le=366), _: Operator = Depends(operator), res: Resources = Depends(resources)
) -> list[ReconcileReport]:
    async with res.sessions() as session:
        runs = (
            await session.scalars(select(db.ReconciliationRun).order_by(db.ReconciliationRun.bill_date.desc()).limit(limit))
        ).all()
    return [report_of(run) for run in runs]


@router.get("/reconciliations/{day}", response_model=ReconciliationView)
async def get_reconciliation(
    day: date, provider: str = "simulator", _: Operator = Depends(operator), res: Resources = Depends(resources)
) -> ReconciliationView:
    rid = run_id(provider, day)
    async with res.sessions() as session:
        run = await session.get(db.ReconciliationRun, rid)
        if run is None:
            raise HTTPException(
                404, f"{day} ({provider}) has not been reconciled; start it with `paysentinel reconcile run --date {day}`"
            )
        loaded = await session.scalar(
            select(func.count()).where(
                db.SettlementRowRecord.provider == provider, db.SettlementRowRecord.bill_date == day.isoformat()
            )
        )
        items = (
            await session.scalars(select(db.Discrepancy).where(db.Discrepancy.run_id == rid).order_by(db.Discrepancy.id))
        ).all()
    return ReconciliationView(
        report=report_of(run),
        bill_rows_loaded=loaded or 0,
        discrepancies=[DiscrepancyView.model_validate(item, from_attributes=True) for item in items],
    )


@router.post("/reconciliations/{day}", status_code=202)
async def start_reconciliation(
    day: date, provider: str = "simulator", who: Operator = Depends(operator), res: Resources = Depends(resources)
) -> dict[str, str]:
    """Reconcile a day now (again, if it was reconciled before: nothing is repaired twice); operator and above."""
    try:
        started = await _start_reconciliation(day, provider, who, res)
    except HTTPException as err:
        await audit(res, who, "reconcile.run", f"{provider} {day}", "", "refused", f"{err.status_code}: {err.detail}")
        raise
    await audit(res, who, "reconcile.run", f"{provider} {day}", "", "done", f"started {started['workflow_id']}")
    return started


async def _start_reconciliation(day: date, provider: str, who: Operator, res: Resources) -> dict[str, str]:
    if not who.may("operator"):
        raise refuse_role(who, "operator", "run reconciliation")
    if provider not in res.providers:
        raise HTTPException(422, f"unknown provider {provider!r}; configured: {', '.join(res.providers)}")
    _day(day, res)
    workflow_id = reconcile_workflow_id(provider, day)
    try:
        running = (await res.client.get_workflow_handle(workflow_id).describe()).status
    except RPCError:
        running = None  # never run before
    if running == WorkflowExecutionStatus.RUNNING:
        raise HTTPException(
            409, f"a reconciliation of {day} is still running ({workflow_id}); run the day again once it has finished"
        )
    await res.client.start_workflow(
        ReconciliationWorkflow.run,
        reconcile_input(res.settings, provider).model_copy(update={"day": day}),
        id=workflow_id,
        task_queue=res.settings.task_queue,
        id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
        id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE,
        static_summary=f"Reconcile {provider} {day} (started by {who.name}, {who.role})",
    )
    return {"workflow_id": workflow_id, "day": day.isoformat(), "provider": provider}


# --- The operator app ---------------------------------------------------------------------


def create_app(settings: Settings) -> FastAPI:
    """The operator API on its own listener (`paysentinel up --parts operator`)."""
    from starters.codec_api import router as codec_router  # it uses `operator` above

    app = FastAPI(title="paysentinel operator API", version="0.1.0", lifespan=lifespan_for(settings))
    app.add_exception_handler(RequestValidationError, readable_validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(HTTPException, error_body)  # type: ignore[arg-type]
    app.include_router(router)
    app.include_router(codec_router)  # the codec endpoint (starters/codec_api.py), behind the same tokens
    add_metrics(app)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    return app
