"""Reconciliation's activities: load the provider's bill, match it three ways, repair,
verify (a repair is resolved once our database shows the money agreeing with the bill).

The three sources: the provider's settlement bill (loaded into ``settlement_rows``),
our database (``payments``, ``refunds``) and the payment workflows (which receive each
difference as a ``settlement`` signal and act through their usual, idempotent paths).
Every step works on a bounded batch, so a 100,000-row day never sits in memory.
"""

from __future__ import annotations

import json
from datetime import date, datetime, timedelta

from sqlalchemy import case, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession
from temporalio import activity
from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from paysentinel import db
from paysentinel.config import timing_from
from paysentinel.models import RefundInput, ReconcileReport, ReconcileStep, RunFailure, SettlementFinding, StepResult, to_major
from paysentinel.names import REFUND_WORKFLOW, SETTLEMENT_SIGNAL, payment_workflow_id
from paysentinel.rules import refund_id_for
from activities.reconcile_bill import BillMatching
from activities.reconcile_common import (
    BAD_BILL,
    INFORMATIONAL,
    OPEN,
    PAID,
    RECORDED_WHEN_AGREED,
    REFUND_IF_FINISHED,
    REFUND_STARTED,
    REFUNDED_WHEN_AGREED,
    TO_WORKFLOW,
    UNPAID_OUTCOMES,
    WAITING,
    report_of,
    run_id,
)

__all__ = [
    "BAD_BILL",
    "OPEN",
    "UNPAID_OUTCOMES",
    "PAID",
    "TO_WORKFLOW",
    "REFUND_IF_FINISHED",
    "INFORMATIONAL",
    "WAITING",
    "REFUND_STARTED",
    "REFUNDED_WHEN_AGREED",
    "RECORDED_WHEN_AGREED",
    "run_id",
    "ReconciliationActivities",
    "report_of",
]


class ReconciliationActivities(BillMatching):
    @activity.defn
    async def days_to_reconcile(self, catchup_days: int) -> list[date]:
        """Yesterday (in the settlement time zone) and every earlier day of the catch-up
        window that has no finished run, oldest first. A PROVISIONAL run (reconciled before
        the day was over) is not finished."""
        yesterday = datetime.now(self._tz).date() - timedelta(days=1)
        days = [yesterday - timedelta(days=n) for n in range(catchup_days + 1)]
        async with self._sessions() as session:
            done = set(
                (
                    await session.scalars(
                        select(db.ReconciliationRun.bill_date).where(
                            db.ReconciliationRun.status == "DONE",
                            db.ReconciliationRun.bill_date.in_([d.isoformat() for d in days]),
                        )
                    )
                ).all()
            )
        return sorted(d for d in days if d.isoformat() not in done)

    @activity.defn
    async def start_run(self, step: ReconcileStep) -> None:
        async with self._sessions() as session:
            run = await session.get(db.ReconciliationRun, run_id(step.provider, step.day))
            if run is None:
                run = db.ReconciliationRun(
                    run_id=run_id(step.provider, step.day), provider=step.provider, bill_date=step.day.isoformat(), passes=0
                )
                session.add(run)
            run.status, run.started_at, run.finished_at, run.error = "RUNNING", db.utcnow(), None, None
            run.passes += 1
            await session.commit()

    @activity.defn
    async def repair(self, step: ReconcileStep) -> StepResult:
        """Act on the next batch of differences nobody acted on yet, through the workflows."""
        async with self._sessions() as session:
            todo = (
                await session.scalars(
                    select(db.Discrepancy)
                    .where(
                        db.Discrepancy.run_id == run_id(step.provider, step.day),
                        db.Discrepancy.id > step.after,
                        db.Discrepancy.resolution.is_(None),
                    )
                    .order_by(db.Discrepancy.id)
                    .limit(step.limit)
                )
            ).all()
        for item in todo:
            resolved, resolution = await self._repair_one(step, item)
            async with self._sessions() as session:
                row = await session.get(db.Discrepancy, item.id)
                assert row is not None, f"difference {item.id} was listed above"
                row.resolved, row.resolution, row.resolved_at = resolved, resolution, db.utcnow() if resolved else None
                await session.commit()
            activity.logger.info("reconciliation %s: %s %s -> %s", row.run_id, item.kind, item.order_id, resolution)
        return StepResult(last=todo[-1].id if todo else step.after, handled=len(todo), done=len(todo) < step.limit)

    async def _repair_one(self, step: ReconcileStep, item: db.Discrepancy) -> tuple[bool, str]:
        payment_id = payment_workflow_id(item.order_id)
        if item.kind in TO_WORKFLOW:
            finding = SettlementFinding(
                kind=item.kind,
                day=step.day,
                order_id=item.order_id,
                trade_no=item.trade_no,
                amount_minor=item.provider_amount_minor or 0,
                currency=item.currency,
                detail=item.detail,
            )
            try:
                await self._client.get_workflow_handle(payment_id).signal(SETTLEMENT_SIGNAL, finding)
                # Delivered is not done: the verification pass resolves it once the money agrees.
                if item.kind == "missing_at_provider":
                    return False, (
                        f"delivered to the payment workflow ({payment_id}): a settlement_mismatch review, a person decides"
                    )
                review = "; a settlement_mismatch review decides" if item.kind == "amount_differs" else ""
                return False, f"delivered to the payment workflow, {WAITING} ({payment_id}{review})"
            except RPCError as err:
                if err.status != RPCStatusCode.NOT_FOUND:
                    raise
            if item.kind not in REFUND_IF_FINISHED:
                return False, f"needs an operator: the payment workflow {payment_id} has finished"
        if item.kind == "unknown_order":
            over = await self._above_refund_limit(step, item)
            if over:
                return False, f"needs an operator: above the automatic refund limit ({over})"
        if item.kind in REFUND_IF_FINISHED or item.kind == "unknown_order":
            workflow_id = await self._refund(step, item)
            return False, f"{REFUND_STARTED} ({workflow_id}), {WAITING}"
        return False, "needs an operator"

    async def _above_refund_limit(self, step: ReconcileStep, item: db.Discrepancy) -> str | None:
        """Why refunding this unknown order would exceed the day's automatic refund limit
        (PAYSENTINEL_RECONCILE_AUTO_REFUND_MAX_COUNT / _MAX_MINOR), or None."""
        most, most_minor = self._settings.reconcile_auto_refund_max_count, self._settings.reconcile_auto_refund_max_minor
        async with self._sessions() as session:
            count, total = (
                await session.execute(
                    select(func.count(), func.coalesce(func.sum(db.Discrepancy.provider_amount_minor), 0)).where(
                        db.Discrepancy.run_id == item.run_id,
                        db.Discrepancy.kind == "unknown_order",
                        db.Discrepancy.currency == item.currency,
                        db.Discrepancy.id != item.id,
                        db.Discrepancy.resolution.like(f"{REFUND_STARTED}%"),
                    )
                )
            ).one()
        amount = item.provider_amount_minor or 0
        if count + 1 > most:
            return f"{count} refunded automatically on {step.day}, at most {most} a day"
        if int(total or 0) + amount > most_minor:
            return (
                f"{to_major(int(total or 0), item.currency)} {item.currency} refunded automatically on {step.day}, "
                f"{to_major(amount, item.currency)} more would exceed "
                f"{to_major(most_minor, item.currency)} {item.currency} a day"
            )
        return None

    @activity.defn
    async def verify(self, step: ReconcileStep) -> StepResult:
        """Resolve the next batch of acted-on differences whose money now agrees with the
        bill in our database (a repair counts once the owning workflow has done it)."""
        async with self._sessions() as session:
            todo = (
                await session.scalars(
                    select(db.Discrepancy)
                    .where(
                        db.Discrepancy.run_id == run_id(step.provider, step.day),
                        db.Discrepancy.id > step.after,
                        db.Discrepancy.resolved.is_(False),
                        db.Discrepancy.resolution.like(f"%{WAITING}%"),
                    )
                    .order_by(db.Discrepancy.id)
                    .limit(step.limit)
                )
            ).all()
            for item in todo:
                evidence = await self._agrees(session, item)
                if evidence is not None:
                    item.resolved, item.resolved_at = True, db.utcnow()
                    item.resolution = f"{item.resolution}; verified: {evidence}"
                    activity.logger.info("reconciliation %s: %s %s verified: %s", item.run_id, item.kind, item.order_id, evidence)
            await session.commit()
        activity.heartbeat(len(todo))
        return StepResult(last=todo[-1].id if todo else step.after, handled=len(todo), done=len(todo) < step.limit)

    @activity.defn
    async def count_waiting(self, step: ReconcileStep) -> int:
        """How many acted-on differences of the day still wait for the money to agree."""
        async with self._sessions() as session:
            return int(
                await session.scalar(
                    select(func.count())
                    .select_from(db.Discrepancy)
                    .where(
                        db.Discrepancy.run_id == run_id(step.provider, step.day),
                        db.Discrepancy.resolved.is_(False),
                        db.Discrepancy.resolution.like(f"%{WAITING}%"),
                    )
                )
                or 0
            )

    async def _agrees(self, session: AsyncSession, item: db.Discrepancy) -> str | None:
        """What in our database shows the money agreeing with the bill for this difference, or None."""
        amount = item.provider_amount_minor or 0
        money = f"{to_major(amount, item.currency)} {item.currency}"
        refunds = (await session.scalars(select(db.Refund).where(db.Refund.order_id == item.order_id))).all()
        refunded = sum(r.amount_minor for r in refunds if r.trade_no == item.trade_no and r.status == "SUCCEEDED")
        if item.kind in REFUNDED_WHEN_AGREED | RECORDED_WHEN_AGREED and amount and refunded >= amount:
            return f"trade {item.trade_no} refunded ({to_major(refunded, item.currency)} {item.currency})"
        if item.kind in RECORDED_WHEN_AGREED:
            payment = await session.scalar(select(db.Payment).where(db.Payment.order_id == item.order_id))
            if payment is None or payment.trade_no != item.trade_no or payment.status not in PAID:
                return None
            extra = sum(r.amount_minor for r in refunds if r.trade_no != payment.trade_no)
            if (payment.paid_amount_minor or 0) - extra == amount and payment.currency == item.currency:
                return f"our payment records trade {item.trade_no} paid with {money} ({payment.status})"
        return None

    async def _refund(self, step: ReconcileStep, item: db.Discrepancy) -> str:
        """Refund a charge no running payment workflow owns; one refund per trade, ever."""
        workflow_id = f"reconcile-refund-{step.provider}-{item.trade_no}"
        money = f"{to_major(item.provider_amount_minor or 0, item.currency)} {item.currency}"
        try:
            await self._client.start_workflow(
                REFUND_WORKFLOW,
                RefundInput(
                    payment_id=payment_workflow_id(item.order_id),
                    provider=step.provider,
                    order_id=item.order_id,
                    trade_no=item.trade_no,
                    refund_id=refund_id_for(item.order_id, f"settle-{item.trade_no}"),
                    amount_minor=item.provider_amount_minor or 0,
                    currency=item.currency,
                    reason=f"reconciliation {step.day}: {item.kind}",
                    requested_by="reconciliation",
                    timing=timing_from(self._settings),
                ),
                id=workflow_id,
                task_queue=activity.info().task_queue,
                id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
                id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
                static_summary=f"Refund {money} of order {item.order_id} (reconciliation {step.day})",
            )
        except WorkflowAlreadyStartedError:
            pass  # refunded by an earlier run: the same refund, not another
        return workflow_id

    @activity.defn
    async def fail_run(self, failure: RunFailure) -> ReconcileReport:
        """Record why a run stopped; the rows loaded so far stay for the next run."""
        async with self._sessions() as session:
            run = await session.get(db.ReconciliationRun, run_id(failure.provider, failure.day))
            assert run is not None, "start_run records the run first"
            run.status, run.error, run.finished_at = "FAILED", failure.error, db.utcnow()
            await session.commit()
            return report_of(run)

    @activity.defn
    async def finish(self, step: ReconcileStep) -> ReconcileReport:
        """The report. Differences of earlier passes that this pass's bill no longer shows
        are over. A day not yet over in the settlement time zone is PROVISIONAL: its bill can
        still grow, so the schedule reconciles it again once the day is over."""
        rid = run_id(step.provider, step.day)
        async with self._sessions() as session:
            seen = await self._pass(session, step)
            await session.execute(
                update(db.Discrepancy)
                .where(
                    db.Discrepancy.run_id == rid,
                    db.Discrepancy.resolved.is_(False),
                    db.Discrepancy.seen_pass.is_not(None),
                    db.Discrepancy.seen_pass < seen,
                )
                .values(resolved=True, resolution=db.STALE, resolved_at=db.utcnow())
            )
            rows = await session.scalar(
                select(func.count()).where(
                    db.SettlementRowRecord.provider == step.provider, db.SettlementRowRecord.bill_date == step.day.isoformat()
                )
            )
            items = (
                await session.execute(
                    select(
                        db.Discrepancy.kind,
                        func.count(),
                        func.coalesce(func.sum(db.Discrepancy.provider_amount_minor), 0),
                        func.sum(case((db.Discrepancy.resolved.is_(False), 1), else_=0)),
                    )
                    .where(db.Discrepancy.run_id == rid)
                    .group_by(db.Discrepancy.kind)
                )
            ).all()
            classes = {
                kind: {"count": count, "amount_minor": int(amount), "unresolved": int(open_ or 0)}
                for kind, count, amount, open_ in items
            }
            flagged_rows = sum(c["count"] for k, c in classes.items() if k not in INFORMATIONAL | {"missing_at_provider"})
            boundary = classes.get("day_boundary", {}).get("count", 0)
            unresolved = sum(c["unresolved"] for c in classes.values())
            run = await session.get(db.ReconciliationRun, rid)
            assert run is not None, "start_run records the run first"
            final = self._day_bounds(step.day)[1] <= db.utcnow()
            run.status, run.rows, run.unresolved = "DONE" if final else "PROVISIONAL", rows or 0, unresolved
            run.matched, run.day_boundary = (rows or 0) - flagged_rows, boundary
            run.classes, run.finished_at = json.dumps(classes), db.utcnow()
            await session.commit()
            return report_of(run)
