"""The payment row the workflow writes (``db.apply_record``), on PostgreSQL and on SQLite.

The newest snapshot wins (an older or repeated one changes nothing), and the first snapshot
carrying the payment's outcome records it with the time it was reached; later ones (a refund
after the payment succeeded) leave both as they were."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta

import pytest

from paysentinel import db
from paysentinel.models import PaymentRecord, PaymentStatus


@pytest.fixture(params=["postgresql", "sqlite"])
async def rows(request, database_url: str, tmp_path):
    url = database_url
    if request.param == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / 'app.db'}"
        await asyncio.to_thread(db.upgrade, url)
    engine = db.make_engine(url)
    yield db.make_sessionmaker(engine)
    await engine.dispose()


async def _row(sessions, payment_id: str) -> db.Payment:
    async with sessions() as session:
        row = await session.get(db.Payment, payment_id)
    assert row is not None
    return row


async def test_newest_snapshot_wins_and_the_outcome_is_recorded_once(rows):
    payment_id = f"payment-rows-{uuid.uuid4().hex[:8]}"
    at = db.utcnow()
    async with rows() as session:
        session.add(
            db.Payment(
                payment_id=payment_id,
                order_id=payment_id.removeprefix("payment-"),
                provider="simulator",
                amount_minor=1000,
                currency="CNY",
                status="CREATED",
                status_seq=0,
                expires_at=at + timedelta(minutes=15),
            )
        )
        await session.commit()

    def record(seq: int, status: PaymentStatus, **values) -> PaymentRecord:
        return PaymentRecord(payment_id=payment_id, seq=seq, status=status, **values)

    pending = await db.apply_record(rows, record(1, PaymentStatus.PENDING, trade_no="T1"))
    assert (pending.applied, pending.finished, pending.provider) == (True, False, "simulator")
    row = await _row(rows, payment_id)
    assert (row.status, row.trade_no, row.outcome, row.finished_at) == ("PENDING", "T1", None, None)

    paid = record(2, PaymentStatus.SUCCEEDED, trade_no="T1", paid_amount_minor=1000, outcome=PaymentStatus.SUCCEEDED)
    succeeded = await db.apply_record(rows, paid)
    assert (succeeded.applied, succeeded.finished) == (True, True)
    row = await _row(rows, payment_id)
    assert (row.status, row.outcome, row.paid_amount_minor) == ("SUCCEEDED", "SUCCEEDED", 1000)
    assert row.finished_at is not None
    finished_at = row.finished_at

    # The same snapshot again (a retried write) and an older one change nothing.
    assert (await db.apply_record(rows, paid)).applied is False
    assert (await db.apply_record(rows, record(1, PaymentStatus.PENDING, trade_no="T1"))).applied is False
    assert (await _row(rows, payment_id)).status == "SUCCEEDED"

    # A later snapshot (the payment refunded) keeps the outcome and when it was reached.
    refunded = await db.apply_record(
        rows,
        record(3, PaymentStatus.REFUNDED, trade_no="T1", refunded_minor=1000, outcome=PaymentStatus.SUCCEEDED),
    )
    assert (refunded.applied, refunded.finished) == (True, False)
    row = await _row(rows, payment_id)
    assert (row.status, row.refunded_minor, row.outcome, row.finished_at) == ("REFUNDED", 1000, "SUCCEEDED", finished_at)


async def test_a_snapshot_of_an_unknown_payment_writes_nothing(rows):
    missing = PaymentRecord(payment_id="payment-nobody", seq=1, status=PaymentStatus.PENDING)
    assert (await db.apply_record(rows, missing)).applied is False
