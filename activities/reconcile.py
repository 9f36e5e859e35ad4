"""Reconciliation's activities: load the provider's bill, match it three ways, repair,
verify (a repair is resolved once our database shows the money agreeing with the bill).

The three sources: the provider's settlement bill (loaded into ``settlement_rows``),
our database (``payments``, ``refunds``) and the payment workflows (which receive each
difference as a ``settlement`` signal and act through their usual, idempotent paths).
Every step works on a bounded batch, so a 100,000-row day never sits in memory.
"""

from __future__ import annotations

import json
from datetime import date, datetime, time, timedelta, timezone
from zoneinfo import ZoneInfo

from sqlalchemy import case, delete, exists, func, select, text, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio import activity
from temporalio.client import Client
from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from temporalio.exceptions import ApplicationError, WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from paysentinel import db
from paysentinel.config import Settings, timing_from
from paysentinel.models import (
    RefundInput,
    ReconcileReport,
    ReconcileStep,
    RunFailure,
    SettlementFinding,
    StepResult,
    to_major,
)
from paysentinel.names import REFUND_WORKFLOW, SETTLEMENT_SIGNAL, payment_workflow_id
from paysentinel.providers import Provider
from paysentinel.rules import refund_id_for
from paysentinel.settlement import PAYMENT, REFUND, BillFormatError

BAD_BILL = "BadBill"
OPEN = ("CREATED", "PENDING")
UNPAID_OUTCOMES = ("CLOSED", "FAILED")
PAID = ("SUCCEEDED", "REFUNDING", "PARTIALLY_REFUNDED", "REFUNDED", "IN_REVIEW")
# What each class of difference gets: the payment's workflow, a refund of its own, or a person.
TO_WORKFLOW = {
    "open_payment",
    "paid_during_review",
    "closed_order_paid",
    "duplicate_charge",
    "amount_differs",
    "missing_at_provider",
}
REFUND_IF_FINISHED = {"closed_order_paid", "duplicate_charge"}
INFORMATIONAL = {"day_boundary"}
# A repair is resolved only once our database shows the money agreeing with the bill.
WAITING = "waiting for the money to agree"
REFUND_STARTED = "refund started"
# Which differences the money can settle, and how (see _agrees).
REFUNDED_WHEN_AGREED = {"closed_order_paid", "duplicate_charge", "unknown_order"}
RECORDED_WHEN_AGREED = {"open_payment", "paid_during_review", "amount_differs"}


def run_id(provider: str, day: date) -> str:
    return f"{provider}:{day.isoformat()}"


class ReconciliationActivities:
    def __init__(
        self, sessions: async_sessionmaker[AsyncSession], providers: dict[str, Provider], client: Client, settings: Settings
    ):
        self._sessions = sessions
        self._providers = providers
        self._client = client
        self._settings = settings
        self._tz = ZoneInfo(settings.settlement_timezone)

    def _day_bounds(self, day: date) -> tuple[datetime, datetime]:
        start = datetime.combine(day, time(), self._tz).astimezone(timezone.utc)
        return start, start + timedelta(days=1)

    def _local_day(self, moment: datetime) -> date:
        return moment.astimezone(self._tz).date()

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
    async def load_bill(self, step: ReconcileStep) -> StepResult:
        """Stream the provider's bill into settlement_rows in batches (a row loaded twice is
        ignored), heartbeating the count so a retry skips what is already in. A run that
        starts loading replaces the rows an earlier run of the day loaded: a corrected bill
        counts as the provider serves it now."""
        provider = self._providers[step.provider]
        details = activity.info().heartbeat_details
        resume = int(details[0]) if details else 0
        count, batch = 0, list[dict]()
        if not resume:  # the bill as the provider serves it now replaces what an earlier run loaded
            async with self._sessions() as session:
                await session.execute(
                    delete(db.SettlementRowRecord).where(
                        db.SettlementRowRecord.provider == step.provider, db.SettlementRowRecord.bill_date == step.day.isoformat()
                    )
                )
                await session.commit()

        async def flush() -> None:
            async with self._sessions() as session:
                await db.insert_ignoring_duplicates(session, db.SettlementRowRecord.__table__, batch)
                await session.commit()
            batch.clear()
            activity.heartbeat(count)

        try:
            async for row in provider.bill_rows(step.day, self._tz):
                count += 1
                if count <= resume:
                    continue
                batch.append({"provider": step.provider, "bill_date": step.day.isoformat(), **row.model_dump()})
                if len(batch) >= step.limit:
                    await flush()
        except BillFormatError as err:  # the same bill fails the same way: no retry
            raise ApplicationError(
                f"the {step.provider} bill of {step.day} cannot be read: {err}", type=BAD_BILL, non_retryable=True
            ) from err
        if batch:
            await flush()
        async with self._sessions() as session:
            if session.get_bind().dialect.name == "postgresql":  # fresh statistics, so matching uses the indexes
                await session.execute(text("ANALYZE settlement_rows"))
                await session.commit()
        activity.logger.info("bill %s %s: %d rows loaded", step.provider, step.day, count)
        return StepResult(last=count, handled=count, done=True)

    @activity.defn
    async def classify(self, step: ReconcileStep) -> StepResult:
        """Match the next batch of bill rows against our payments and refunds."""
        async with self._sessions() as session:
            rows = (
                await session.scalars(
                    select(db.SettlementRowRecord)
                    .where(
                        db.SettlementRowRecord.provider == step.provider,
                        db.SettlementRowRecord.bill_date == step.day.isoformat(),
                        db.SettlementRowRecord.id > step.after,
                    )
                    .order_by(db.SettlementRowRecord.id)
                    .limit(step.limit)
                )
            ).all()
            orders = {r.order_id for r in rows}
            payments = (
                {p.order_id: p for p in (await session.scalars(select(db.Payment).where(db.Payment.order_id.in_(orders)))).all()}
                if orders
                else {}
            )
            refunds = (await session.scalars(select(db.Refund).where(db.Refund.order_id.in_(orders)))).all() if orders else []
            seen = await self._pass(session, step)
        refunds_by_id = {r.refund_id: r for r in refunds}
        found = []
        for row in rows:
            if row.kind == PAYMENT:
                found += self._classify_payment(
                    step, row, payments.get(row.order_id), [r for r in refunds if r.order_id == row.order_id]
                )
            elif row.kind == REFUND:
                found += self._classify_refund(step, row, refunds_by_id.get(row.refund_no))
        if found:
            async with self._sessions() as session:
                await db.upsert_findings(session, [{**f, "seen_pass": seen} for f in found])
                await session.commit()
        activity.heartbeat(len(rows))
        return StepResult(last=rows[-1].id if rows else step.after, handled=len(rows), done=len(rows) < step.limit)

    async def _pass(self, session: AsyncSession, step: ReconcileStep) -> int:
        """The run's current pass (how many times the day was started)."""
        return (
            await session.scalar(
                select(db.ReconciliationRun.passes).where(db.ReconciliationRun.run_id == run_id(step.provider, step.day))
            )
            or 0
        )

    def _finding(self, step: ReconcileStep, kind: str, row, ours: int | None, detail: str, **extra) -> dict:
        return {
            "run_id": run_id(step.provider, step.day),
            "kind": kind,
            "order_id": row.order_id,
            "trade_no": row.trade_no,
            "refund_no": row.refund_no,
            "provider_amount_minor": row.amount_minor,
            "our_amount_minor": ours,
            "currency": row.currency,
            "detail": detail,
            "resolution": None,
            "resolved": False,
            "created_at": db.utcnow(),
            "resolved_at": None,
            **extra,
        }

    def _classify_payment(self, step, row, payment, refunds: list) -> list[dict]:
        """One bill payment row against our payment of the order. The comparison is with
        what we recorded as captured (``paid_amount_minor``; None is nothing captured),
        never with the order's amount."""
        money = f"{to_major(row.amount_minor, row.currency)} {row.currency}"
        if payment is None:
            return [
                self._finding(
                    step,
                    "unknown_order",
                    row,
                    None,
                    f"the provider took {money} (trade {row.trade_no}) for an order we have no record of",
                )
            ]
        captured = payment.paid_amount_minor or 0
        if payment.status in OPEN:
            return [
                self._finding(
                    step,
                    "open_payment",
                    row,
                    captured,
                    f"paid at the provider ({money}) while our payment is still {payment.status}",
                )
            ]
        of_trade = [r for r in refunds if r.trade_no == row.trade_no]
        if row.trade_no != payment.trade_no or not captured:
            if of_trade:  # a charge we know and refunded (or are refunding): we took what we refunded
                ours = sum(r.amount_minor for r in of_trade)
                return self._compare(step, row, payment, ours, money)
            if payment.status in UNPAID_OUTCOMES:
                return [
                    self._finding(
                        step,
                        "closed_order_paid",
                        row,
                        0,
                        f"paid at the provider ({money}) after our payment was {payment.status}",
                    )
                ]
            if not captured:
                return [
                    self._finding(
                        step,
                        "paid_during_review" if payment.status == "IN_REVIEW" else "open_payment",
                        row,
                        0,
                        f"paid at the provider ({money}); our payment is {payment.status} with nothing captured",
                    )
                ]
            return [
                self._finding(
                    step,
                    "duplicate_charge",
                    row,
                    captured,
                    f"a second paid trade {row.trade_no} ({money}); the order is paid with {payment.trade_no}",
                )
            ]
        # What we took with this trade: all we captured, less the other (extra) trades, refunded in full.
        extra = sum(r.amount_minor for r in refunds if r.trade_no != payment.trade_no)
        found = self._compare(step, row, payment, captured - extra, money)
        if found:
            return found
        if payment.paid_at is not None and self._local_day(payment.paid_at) != step.day:
            return [
                self._finding(
                    step,
                    "day_boundary",
                    row,
                    captured - extra,
                    f"we recorded the payment on {self._local_day(payment.paid_at)}, the provider on {step.day}: matched",
                    resolution="matched across the day boundary",
                    resolved=True,
                )
            ]
        return []

    def _compare(self, step, row, payment, ours: int, money: str) -> list[dict]:
        if ours != row.amount_minor or payment.currency != row.currency:
            return [
                self._finding(
                    step,
                    "amount_differs",
                    row,
                    ours,
                    f"the bill reports {money} for trade {row.trade_no}; we recorded "
                    f"{to_major(ours, payment.currency)} {payment.currency}",
                )
            ]
        return []

    def _classify_refund(self, step, row, refund) -> list[dict]:
        money = f"{to_major(row.amount_minor, row.currency)} {row.currency}"
        if refund is None:
            return [
                self._finding(
                    step,
                    "refund_unknown",
                    row,
                    None,
                    f"the provider refunded {money} ({row.refund_no}) that we have no record of",
                    resolution="needs an operator: find who refunded it at the provider",
                )
            ]
        if refund.amount_minor != row.amount_minor:
            return [
                self._finding(
                    step,
                    "refund_differs",
                    row,
                    refund.amount_minor,
                    f"the bill refunds {money}; our refund {refund.refund_id} is "
                    f"{to_major(refund.amount_minor, refund.currency)} {refund.currency}",
                    resolution="needs an operator: the refund amounts differ",
                )
            ]
        if refund.status == "PROCESSING":
            return [
                self._finding(
                    step,
                    "refund_differs",
                    row,
                    refund.amount_minor,
                    "refunded at the provider, still processing on our side",
                    resolution="its refund workflow confirms it on its next query",
                    resolved=True,
                )
            ]
        if refund.status != "SUCCEEDED":
            return [
                self._finding(
                    step,
                    "refund_differs",
                    row,
                    refund.amount_minor,
                    f"refunded at the provider, {refund.status} on our side",
                    resolution="needs an operator: we consider this refund failed",
                )
            ]
        return []

    @activity.defn
    async def find_missing(self, step: ReconcileStep) -> StepResult:
        """Our paid payments of the day that the bill lacks; the provider's own query tells
        a payment counted on the neighbouring day (matched) from one it never settled. Each
        query is followed by a heartbeat (queries done so far), so a batch of thousands never
        outlasts the heartbeat timeout."""
        start, end = self._day_bounds(step.day)
        rid = run_id(step.provider, step.day)
        async with self._sessions() as session:
            seen = await self._pass(session, step)
        billed = exists().where(
            db.SettlementRowRecord.provider == step.provider,
            db.SettlementRowRecord.kind == PAYMENT,
            db.SettlementRowRecord.trade_no == db.Payment.trade_no,
            db.SettlementRowRecord.bill_date.in_([(step.day + timedelta(days=d)).isoformat() for d in (-1, 0, 1)]),
        )
        noted = exists().where(
            db.Discrepancy.run_id == rid,
            db.Discrepancy.order_id == db.Payment.order_id,
            db.Discrepancy.kind.in_(("missing_at_provider", "day_boundary")),
            db.Discrepancy.seen_pass == seen,
        )
        async with self._sessions() as session:
            candidates = (
                await session.scalars(
                    select(db.Payment)
                    .where(
                        db.Payment.provider == step.provider,
                        db.Payment.paid_at >= start,
                        db.Payment.paid_at < end,
                        db.Payment.status.in_(PAID),
                        db.Payment.trade_no.is_not(None),
                        ~billed,
                        ~noted,
                    )
                    .limit(step.limit)
                )
            ).all()
        found = []
        for queried, payment in enumerate(candidates, 1):
            trade = await self._providers[step.provider].query_trade(payment.order_id, created_trade_no=payment.trade_no)
            activity.heartbeat(f"{queried} of {len(candidates)} payments queried")
            row = db.SettlementRowRecord(
                order_id=payment.order_id,
                trade_no=payment.trade_no,
                refund_no="",
                amount_minor=payment.paid_amount_minor or payment.amount_minor,
                currency=payment.currency,
            )
            paid_day = self._local_day(trade.paid_at) if trade.paid_at else None
            if trade.exists and trade.status is not None and trade.status.is_paid and paid_day != step.day:
                found.append(
                    self._finding(
                        step,
                        "day_boundary",
                        row,
                        row.amount_minor,
                        f"the provider counts this payment on {paid_day}, we on {step.day}: matched",
                        resolution="matched across the day boundary",
                        resolved=True,
                    )
                )
            else:
                said = (
                    f"the provider's query says {trade.status.value} on {paid_day}"
                    if trade.exists and trade.status
                    else "the provider has no such trade"
                )
                found.append(
                    self._finding(
                        step,
                        "missing_at_provider",
                        row,
                        row.amount_minor,
                        f"we recorded {to_major(row.amount_minor, row.currency)} {row.currency} "
                        f"paid on {step.day} (trade {payment.trade_no}); the bill lacks it and {said}",
                    )
                )
        refunds = await self._refunds_missing(step, start, end, found, seen)
        if found:
            async with self._sessions() as session:
                await db.upsert_findings(session, [{**f, "seen_pass": seen} for f in found])
                await session.commit()
        return StepResult(last=0, handled=len(found), done=len(candidates) < step.limit and refunds < step.limit)

    async def _refunds_missing(self, step: ReconcileStep, start: datetime, end: datetime, found: list[dict], seen: int) -> int:
        """Our refunds that succeeded on the day but are not in the bill: asked of the provider."""
        rid = run_id(step.provider, step.day)
        billed = exists().where(
            db.SettlementRowRecord.provider == step.provider,
            db.SettlementRowRecord.kind == REFUND,
            db.SettlementRowRecord.refund_no == db.Refund.refund_id,
            db.SettlementRowRecord.bill_date.in_([(step.day + timedelta(days=d)).isoformat() for d in (-1, 0, 1)]),
        )
        noted = exists().where(
            db.Discrepancy.run_id == rid, db.Discrepancy.refund_no == db.Refund.refund_id, db.Discrepancy.seen_pass == seen
        )
        async with self._sessions() as session:
            candidates = (
                await session.scalars(
                    select(db.Refund)
                    .join(db.Payment, db.Payment.payment_id == db.Refund.payment_id)
                    .where(
                        db.Payment.provider == step.provider,
                        db.Refund.status == "SUCCEEDED",
                        db.Refund.updated_at >= start,
                        db.Refund.updated_at < end,
                        ~billed,
                        ~noted,
                    )
                    .limit(step.limit)
                )
            ).all()
        for queried, refund in enumerate(candidates, 1):
            theirs = await self._providers[step.provider].query_refund(refund.order_id, refund.refund_id, refund.trade_no)
            activity.heartbeat(f"{queried} of {len(candidates)} refunds queried")
            row = db.SettlementRowRecord(
                order_id=refund.order_id,
                trade_no=refund.trade_no,
                refund_no=refund.refund_id,
                amount_minor=refund.amount_minor,
                currency=refund.currency,
            )
            money = f"{to_major(refund.amount_minor, refund.currency)} {refund.currency}"
            near_edge = min(refund.updated_at - start, end - refund.updated_at) < timedelta(minutes=10)
            if theirs is not None and theirs.status.value == "SUCCEEDED" and near_edge:
                found.append(
                    self._finding(
                        step,
                        "day_boundary",
                        row,
                        refund.amount_minor,
                        f"refund {refund.refund_id} ({money}) settled on a neighbouring day: matched",
                        resolution="matched across the day boundary",
                        resolved=True,
                    )
                )
                continue
            said = f"the provider says {theirs.status.value}" if theirs is not None else "the provider has no such refund"
            found.append(
                self._finding(
                    step,
                    "refund_missing_at_provider",
                    row,
                    refund.amount_minor,
                    f"our refund {refund.refund_id} of {money} succeeded on {step.day}; the bill lacks it and {said}",
                    resolution="needs an operator: check the refund with the provider",
                )
            )
        return len(candidates)

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


def report_of(run: db.ReconciliationRun) -> ReconcileReport:
    return ReconcileReport(
        run_id=run.run_id,
        provider=run.provider,
        day=date.fromisoformat(run.bill_date),
        status=run.status,
        rows=run.rows,
        matched=run.matched,
        day_boundary=run.day_boundary,
        classes=json.loads(run.classes or "{}"),
        unresolved=run.unresolved,
        passes=run.passes,
        started_at=run.started_at,
        finished_at=run.finished_at,
        error=run.error,
    )
