"""Reconciliation's rules without servers: reading the bill, classifying a row, the
automatic refund limit, verification, provisional days and booking a reconciliation
refund, on a real SQLite application database (the product's default)."""

from __future__ import annotations

import asyncio
from datetime import date, datetime, timedelta, timezone
from types import SimpleNamespace
from zoneinfo import ZoneInfo

import pytest
from pydantic import ValidationError
from temporalio.testing import ActivityEnvironment

from activities.reconcile import ReconciliationActivities, run_id
from paysentinel import db
from paysentinel.config import Settings
from paysentinel.models import CheckoutRequest, ReconcileStep, RefundRecord, RefundStatus
from paysentinel.settlement import BillFormatError, parse_bill
from paysentinel.simulator.bills import DayBill

TZ = ZoneInfo("Asia/Shanghai")
DAY = date(2026, 11, 20)


async def pieces(text: str, size: int):
    for i in range(0, len(text), size):
        yield text[i : i + size]


def read(text: str, size: int = 7) -> list:
    async def go():
        return [row async for row in parse_bill(pieces(text, size), TZ)]

    return asyncio.run(go())


def trade(order: str, subject: str, amount: str = "99.90") -> SimpleNamespace:
    paid = datetime(2026, 11, 20, 4, 0, tzinfo=timezone.utc)
    return SimpleNamespace(
        trade_no=f"T-{order}",
        out_trade_no=order,
        subject=subject,
        gmt_create=paid,
        gmt_payment=paid,
        currency="CNY",
        total_amount=amount,
        refunds={},
    )


def test_a_subject_with_line_breaks_keeps_the_bill_readable():
    bill = "".join(
        DayBill(DAY, TZ).lines(
            [
                trade("o-1", "first line\nsecond line"),
                trade("o-2", 'a "quoted"\r\nword, and a comma', "1.00"),
                trade("o-3", "plain"),
            ]
        )
    )
    assert '"first line\nsecond line"' in bill  # quoted as a CSV writer quotes it
    for size in (1, 7, 4096):  # however the stream is cut into pieces
        rows = read(bill, size)
        assert [(r.order_id, r.amount_minor) for r in rows] == [("o-1", 9990), ("o-2", 100), ("o-3", 9990)]


def test_a_quoted_field_never_closed_names_its_line():
    header = (
        "支付宝交易号,商户订单号,业务类型,商品名称,创建时间,完成时间,币种,订单金额（元）,商家实收（元）,退款批次号/请求号,备注\n"
    )
    with pytest.raises(BillFormatError, match="line 3: a quoted field is never closed"):
        read("#bill\n" + header + 'T1,o-1,交易,"open,2026-11-20 12:00:00,2026-11-20 12:00:00,CNY,1.00,1.00,,\n')


@pytest.mark.parametrize("field", ["subject", "device_id", "client_ip"])
def test_control_characters_in_a_checkout_are_refused(field):
    with pytest.raises(ValidationError, match="must not contain control characters"):
        CheckoutRequest(order_id="o-1", amount_minor=100, **{field: "coffee\x00beans"})
    assert CheckoutRequest(order_id="o-1", amount_minor=100, subject="two\nlines").subject == "two\nlines"


# --- Classification ---------------------------------------------------------------------


def activities(**settings) -> ReconciliationActivities:
    return ReconciliationActivities(None, {}, None, Settings(**settings))  # type: ignore[arg-type]


STEP = ReconcileStep(provider="simulator", day=DAY)


def row(amount: int = 9990, trade_no: str = "T1") -> SimpleNamespace:
    return SimpleNamespace(kind="payment", order_id="o-1", trade_no=trade_no, refund_no="", amount_minor=amount, currency="CNY")


def payment(status: str, paid: int | None, trade_no: str = "T1") -> SimpleNamespace:
    return SimpleNamespace(
        status=status,
        paid_amount_minor=paid,
        amount_minor=9990,
        currency="CNY",
        trade_no=trade_no,
        paid_at=datetime(2026, 11, 20, 4, tzinfo=timezone.utc),
    )


def refund(amount: int, trade_no: str = "T1") -> SimpleNamespace:
    return SimpleNamespace(trade_no=trade_no, amount_minor=amount, status="SUCCEEDED", order_id="o-1")


def kinds(found: list[dict]) -> list[tuple[str, int | None]]:
    return [(f["kind"], f["our_amount_minor"]) for f in found]


def test_a_payment_in_review_with_nothing_captured_is_not_matched():
    found = activities()._classify_payment(STEP, row(), payment("IN_REVIEW", None), [])
    assert kinds(found) == [("paid_during_review", 0)]


def test_bill_amounts_are_compared_with_what_we_captured_not_the_order():
    rules = activities()
    assert kinds(rules._classify_payment(STEP, row(), payment("CLOSED", None), [])) == [("closed_order_paid", 0)]
    assert kinds(rules._classify_payment(STEP, row(), payment("IN_REVIEW", 5000), [])) == [("amount_differs", 5000)]
    # Refunded and partially refunded payments are compared too.
    assert kinds(rules._classify_payment(STEP, row(12000), payment("REFUNDED", 9990), [refund(9990)])) == [
        ("amount_differs", 9990)
    ]
    assert kinds(rules._classify_payment(STEP, row(), payment("PARTIALLY_REFUNDED", 9990), [refund(2000)])) == []
    assert kinds(rules._classify_payment(STEP, row(), payment("REFUNDED", 9990), [refund(9990)])) == []
    # A late charge on a closed order we refunded on our own: we took what we refunded.
    assert kinds(rules._classify_payment(STEP, row(), payment("CLOSED", None), [refund(9990)])) == []
    assert kinds(rules._classify_payment(STEP, row(9000, "T2"), payment("SUCCEEDED", 19980), [refund(9990, "T2")])) == [
        ("amount_differs", 9990)
    ]


# --- With the application database (SQLite) -------------------------------------------


@pytest.fixture
def sessions(tmp_path):
    url = f"sqlite+aiosqlite:///{tmp_path / 'app.db'}"
    db.upgrade(url)
    engine = db.make_engine(url)
    yield db.make_sessionmaker(engine)
    asyncio.run(engine.dispose())


def add(sessions, *rows) -> None:
    async def go():
        async with sessions() as session:
            session.add_all(rows)
            await session.commit()

    asyncio.run(go())


def discrepancy(
    kind: str, trade_no: str, amount: int, resolution: str | None = None, day: date = DAY, order: str = "o-1"
) -> db.Discrepancy:
    return db.Discrepancy(
        run_id=run_id("simulator", day),
        kind=kind,
        order_id=order,
        trade_no=trade_no,
        refund_no="",
        provider_amount_minor=amount,
        our_amount_minor=None,
        currency="CNY",
        detail="",
        resolution=resolution,
        resolved=False,
        seen_pass=1,
    )


def stored(sessions, model, key):
    async def go():
        async with sessions() as session:
            return await session.get(model, key)

    return asyncio.run(go())


def test_unknown_orders_above_the_daily_limit_are_left_for_a_person(sessions):
    add(
        sessions,
        discrepancy("unknown_order", "T1", 500, "refund started (reconcile-refund-simulator-T1), waiting"),
        discrepancy("unknown_order", "T2", 500, order="o-2"),
        discrepancy("unknown_order", "T3", 900_000, order="o-3"),
    )
    step = ReconcileStep(provider="simulator", day=DAY)
    by_count = ReconciliationActivities(sessions, {}, None, Settings(reconcile_auto_refund_max_count=1))
    item = stored(sessions, db.Discrepancy, 2)
    resolved, resolution = asyncio.run(by_count._repair_one(step, item))
    assert not resolved and resolution.startswith("needs an operator: above the automatic refund limit"), resolution
    assert "at most 1 a day" in resolution
    by_amount = ReconciliationActivities(sessions, {}, None, Settings(reconcile_auto_refund_max_minor=100_000))
    resolved, resolution = asyncio.run(by_amount._repair_one(step, stored(sessions, db.Discrepancy, 3)))
    assert not resolved and "5.00 CNY refunded automatically" in resolution and "1000.00 CNY a day" in resolution


def test_a_repair_is_resolved_only_when_the_money_agrees(sessions):
    waiting = "delivered to the payment workflow, waiting for the money to agree (payment-o-1)"
    add(
        sessions,
        db.Payment(
            payment_id="payment-o-1",
            order_id="o-1",
            provider="simulator",
            amount_minor=9990,
            currency="CNY",
            status="PENDING",
            trade_no="T1",
        ),
        discrepancy("open_payment", "T1", 9990, waiting),
        discrepancy("unknown_order", "T9", 500, "refund started (x), waiting for the money to agree", order="o-9"),
    )
    rules = ReconciliationActivities(sessions, {}, None, Settings())
    step = ReconcileStep(provider="simulator", day=DAY)
    result = asyncio.run(ActivityEnvironment().run(rules.verify, step))
    assert result.handled == 2 and not stored(sessions, db.Discrepancy, 1).resolved

    async def paid_and_refunded():
        async with sessions() as session:
            row = await session.get(db.Payment, "payment-o-1")
            row.status, row.paid_amount_minor = "SUCCEEDED", 9990
            session.add(
                db.Refund(
                    refund_id="r9",
                    payment_id="payment-o-9",
                    order_id="o-9",
                    trade_no="T9",
                    amount_minor=500,
                    currency="CNY",
                    status="SUCCEEDED",
                    reason="x",
                    requested_by="reconciliation",
                )
            )
            await session.commit()

    asyncio.run(paid_and_refunded())
    asyncio.run(ActivityEnvironment().run(rules.verify, step))
    first, second = stored(sessions, db.Discrepancy, 1), stored(sessions, db.Discrepancy, 2)
    assert first.resolved and "verified: our payment records trade T1 paid with 99.90 CNY" in first.resolution
    assert second.resolved and "verified: trade T9 refunded" in second.resolution


def test_a_day_not_over_is_provisional_and_reconciled_again(sessions):
    rules = ReconciliationActivities(sessions, {}, None, Settings())
    today = datetime.now(TZ).date()
    for day in (today, today - timedelta(days=1), today - timedelta(days=2)):
        asyncio.run(rules.start_run(ReconcileStep(provider="simulator", day=day)))
    reports = [
        asyncio.run(rules.finish(ReconcileStep(provider="simulator", day=day))) for day in (today, today - timedelta(days=2))
    ]
    assert [r.status for r in reports] == ["PROVISIONAL", "DONE"]

    async def reconciled_before_it_was_over():  # yesterday, run while it was still today
        async with sessions() as session:
            run = await session.get(db.ReconciliationRun, run_id("simulator", today - timedelta(days=1)))
            run.status = "PROVISIONAL"
            await session.commit()

    asyncio.run(reconciled_before_it_was_over())
    days = asyncio.run(ActivityEnvironment().run(rules.days_to_reconcile, 2))
    assert days == [today - timedelta(days=3), today - timedelta(days=1)]  # the DONE day is not run again


def test_a_reconciliation_refund_is_booked_on_the_payment_once(sessions):
    add(
        sessions,
        db.Payment(
            payment_id="payment-o-1",
            order_id="o-1",
            provider="simulator",
            amount_minor=9990,
            currency="CNY",
            status="CLOSED",
            trade_no="T1",
        ),
    )
    record = RefundRecord(
        refund_id="r1",
        payment_id="payment-o-1",
        order_id="o-1",
        trade_no="T1",
        amount_minor=9990,
        currency="CNY",
        status=RefundStatus.PROCESSING,
        reason="reconciliation",
        requested_by="reconciliation",
    )
    asyncio.run(db.save_refund(sessions, record))
    assert stored(sessions, db.Payment, "payment-o-1").paid_amount_minor is None
    done = record.model_copy(update={"status": RefundStatus.SUCCEEDED})
    for _ in range(2):  # a save repeated counts once
        asyncio.run(db.save_refund(sessions, done))
    row = stored(sessions, db.Payment, "payment-o-1")
    assert (row.paid_amount_minor, row.refunded_minor, row.status) == (9990, 9990, "REFUNDED")
