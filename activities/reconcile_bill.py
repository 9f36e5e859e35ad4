"""Reconciliation's matching steps: load the provider's settlement bill, classify each bill
row against our payments and refunds, and find what we recorded that the bill lacks."""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import delete, exists, select, text
from temporalio import activity
from temporalio.exceptions import ApplicationError

from paysentinel import db
from paysentinel.models import ReconcileStep, StepResult, to_major
from paysentinel.settlement import PAYMENT, REFUND, BillFormatError
from activities.reconcile_common import BAD_BILL, OPEN, PAID, UNPAID_OUTCOMES, ReconcileBase, run_id


class BillMatching(ReconcileBase):
    """Loading and matching the bill (the ``load_bill``, ``classify`` and ``find_missing`` activities)."""

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
