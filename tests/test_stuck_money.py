"""Stuck money: a refund or review that nobody runs any more is seen on /metrics and alerted once.

Rows are written straight into the test database for payments whose refund and review
workflows do not exist (a child that ended without its parent recording an outcome); a
payment with a running review workflow, or one written a moment ago, is not stuck."""

from __future__ import annotations

import asyncio
import re
import uuid
from datetime import timedelta

from sqlalchemy import delete

from paysentinel import db
from paysentinel.models import STUCK_KINDS, MonitorInput, StuckMoney
from tests.helpers import wait_for
from tests.test_observability import OPS, _incidents, _run_monitor, scrape, value

HOUR = timedelta(hours=1)


def _payment(payment_id: str, status: str, age: timedelta) -> db.Payment:
    at = db.utcnow() - age
    return db.Payment(
        payment_id=payment_id,
        order_id=payment_id.removeprefix("payment-"),
        provider="simulator",
        amount_minor=1000,
        currency="CNY",
        status=status,
        status_seq=5,
        paid_amount_minor=1000,
        created_at=at,
        updated_at=at,
        expires_at=at + timedelta(seconds=8),
    )


def _refund(refund_id: str, payment_id: str, age: timedelta) -> db.Refund:
    at = db.utcnow() - age
    return db.Refund(
        refund_id=refund_id,
        payment_id=payment_id,
        order_id=payment_id.removeprefix("payment-"),
        trade_no=f"T{refund_id}",
        amount_minor=500,
        currency="CNY",
        status="PROCESSING",
        reason="requested",
        requested_by="merchant",
        submissions=1,
        created_at=at,
        updated_at=at,
    )


def _mails(mailbox, name: str) -> list:
    return [m for m in mailbox.to(OPS) if f"(monitor {name})" in m["Subject"]]


async def test_refunds_and_reviews_nobody_runs_are_stuck_on_metrics_and_alerted_once(stack, client, sessions, mailbox):
    tag = uuid.uuid4().hex[:8]
    name = f"stuck{tag}"
    refunding = f"payment-stuck-refunding-{tag}"  # REFUNDING an hour, no RefundWorkflow
    reviewing = f"payment-stuck-inreview-{tag}"  # IN_REVIEW an hour, no ManualReviewWorkflow
    handled = f"payment-stuck-handled-{tag}"  # IN_REVIEW an hour, its review workflow is running
    fresh = f"payment-stuck-fresh-{tag}"  # REFUNDING written a moment ago: the child may be starting
    slow = f"payment-stuck-slow-{tag}"  # SUCCEEDED, one refund PROCESSING for 4 days (limit: 3 days)
    payments = [refunding, reviewing, handled, fresh, slow]
    refunds = [f"rf-slow-{tag}", f"rf-young-{tag}"]
    # Running workflows on a task queue nobody polls: they stay Running and never act.
    idle_queue = f"idle-{tag}"
    running = [
        await client.start_workflow(
            "ManualReviewWorkflow", {"payment_id": handled}, id=f"{handled}-review-1", task_queue=idle_queue
        ),
        # A reconciliation refund names no payment in its id: it does not cover `refunding`.
        await client.start_workflow(
            "RefundWorkflow", {"payment_id": refunding}, id=f"reconcile-refund-simulator-T{tag}", task_queue=idle_queue
        ),
    ]
    before = await scrape(f"{stack.api_url}/metrics")
    try:
        async with sessions() as session:
            session.add_all(
                [
                    _payment(refunding, "REFUNDING", HOUR),
                    _payment(reviewing, "IN_REVIEW", HOUR),
                    _payment(handled, "IN_REVIEW", HOUR),
                    _payment(fresh, "REFUNDING", timedelta(seconds=1)),
                    _payment(slow, "SUCCEEDED", timedelta(days=4)),
                    _refund(refunds[0], slow, timedelta(days=4)),
                    _refund(refunds[1], fresh, timedelta(seconds=1)),
                ]
            )
            await session.commit()

        expected = {"refunding_without_child": 1, "review_without_child": 1, "refund_processing_too_long": 1, "open_past_ttl": 0}

        async def measured():
            after = await scrape(f"{stack.api_url}/metrics")
            moved = {
                kind: value(after, "paysentinel_stuck_payments", kind=kind)
                - value(before, "paysentinel_stuck_payments", kind=kind)
                for kind in STUCK_KINDS
            }
            return after if moved == expected else None

        # Visibility shows the just-started review workflow a moment later: until then `handled` counts too.
        await wait_for(measured, what=f"/metrics to show {expected} more stuck payments")

        # The monitor alerts once, naming the stuck payments (and not the others).
        monitor = MonitorInput(name=name, min_payments=10**6)  # the rates never alert here
        assert await _run_monitor(client, stack, monitor) == ["stuck_payments: incident opened"]
        [opened] = await wait_for(lambda: asyncio.sleep(0, _mails(mailbox, name) or None), what="the stuck alert")
        assert re.search(r"\d+ payments stuck", opened["Subject"]), opened["Subject"]
        body = opened.get_content()
        for named in (refunding, reviewing, refunds[0], slow):
            assert named in body, (named, body)
        for unnamed in (handled, fresh, refunds[1]):
            assert unnamed not in body, (unnamed, body)
        assert "REFUNDING without a running RefundWorkflow" in body and "What to do:" in body
        [incident] = await _incidents(sessions, name)
        assert (incident.kind, incident.status) == ("stuck_payments", "OPEN")
        assert all(named in incident.detail for named in (refunding, reviewing, refunds[0]))
        assert not any(unnamed in incident.detail for unnamed in (handled, fresh, refunds[1]))

        # The same incident again: nothing new is sent.
        assert await _run_monitor(client, stack, monitor) == []
        await asyncio.sleep(0.5)
        assert len(_mails(mailbox, name)) == 1

        # The money moves again: the incident is over, and that is said once.
        async with sessions() as session:
            await session.execute(delete(db.Payment).where(db.Payment.payment_id.in_(payments)))
            await session.execute(delete(db.Refund).where(db.Refund.refund_id.in_(refunds)))
            await session.commit()
        after = await scrape(f"{stack.api_url}/metrics")
        for kind in STUCK_KINDS:
            assert value(after, "paysentinel_stuck_payments", kind=kind) == value(
                before, "paysentinel_stuck_payments", kind=kind
            ), kind
        assert await _run_monitor(client, stack, monitor) == ["stuck_payments: incident resolved"]
        mails = await wait_for(
            lambda: asyncio.sleep(0, m if len(m := _mails(mailbox, name)) >= 2 else None), what="the all-clear e-mail"
        )
        assert mails[1]["Subject"].startswith("[paysentinel] resolved: no payments stuck")
        assert [i.status for i in await _incidents(sessions, name)] == ["RESOLVED"]
    finally:
        async with sessions() as session:
            await session.execute(delete(db.Payment).where(db.Payment.payment_id.in_(payments)))
            await session.execute(delete(db.Refund).where(db.Refund.refund_id.in_(refunds)))
            await session.commit()
        for handle in running:
            await handle.terminate("test over")


async def test_every_kind_of_stuck_payment_is_on_metrics(stack):
    samples = await scrape(f"{stack.api_url}/metrics")
    assert {labels for name, labels in samples if name == "paysentinel_stuck_payments"} == {
        (("kind", kind),) for kind in STUCK_KINDS
    }


def test_the_alert_names_at_most_ten_payments():
    ids = [f"payment-p{i}" for i in range(30)]
    stuck = StuckMoney(
        counts={"open_past_ttl": 0, "refunding_without_child": 25, "review_without_child": 5, "refund_processing_too_long": 0},
        payments={"refunding_without_child": ids[:10], "review_without_child": ids[25:]},
    )
    line = stuck.describe()
    assert line.startswith("30 stuck: REFUNDING without a running RefundWorkflow: 25 (")
    assert sum(payment in line for payment in ids) == 10
    assert "and 15 more" in line and "IN_REVIEW without a running ManualReviewWorkflow: 5 (5 more)" in line
    assert StuckMoney(counts={}, payments={}).describe() == "nothing stuck"
