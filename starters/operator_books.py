"""Operator routes for reading payments and the audit trail, and for reconciliation reports
(read, or reconcile a day now). See starters/operator_api.py."""

import asyncio
import logging
from datetime import date, datetime, timezone
from typing import Literal, Optional
from zoneinfo import ZoneInfo

from fastapi import APIRouter, Depends, HTTPException, Query
from pydantic import BaseModel
from sqlalchemy import func, select
from temporalio.client import WorkflowExecutionStatus
from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from temporalio.service import RPCError

from paysentinel import db
from activities.reconcile import report_of, run_id
from paysentinel.models import (
    PaymentView,
    ReconcileReport,
)
from starters.common import Resources, resources
from starters.operator_auth import Operator, audit, operator, refuse_role
from workflows.payment import PaymentWorkflow
from workflows.reconcile import ReconciliationWorkflow, reconcile_input, reconcile_workflow_id

log = logging.getLogger("paysentinel.operator")
router = APIRouter(prefix="/operator", tags=["operator"])


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
