"""Queries on payments: claiming an order, writing the workflow's snapshots, provider retries,
and the recent attempts the risk rules read."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import cast

from sqlalchemy import Table, case, func, literal, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from paysentinel.models import CheckoutRequest, PaymentOrder, PaymentRecord, PaymentStatus
from paysentinel.db.tables import Payment, utcnow


class OrderConflict(Exception):
    """The order id is already used by a payment with other parameters."""

    def __init__(self, order_id: str, differences: dict[str, tuple[object, object]]):
        self.order_id = order_id
        self.differences = differences
        details = ", ".join(f"{k}: existing {a!r} vs requested {b!r}" for k, (a, b) in differences.items())
        super().__init__(f"order {order_id} already has a payment with different parameters ({details})")


def _differences(row: Payment, request: CheckoutRequest | PaymentOrder) -> dict[str, tuple[object, object]]:
    pairs = {
        "amount_minor": (row.amount_minor, request.amount_minor),
        "currency": (row.currency, request.currency),
        "provider": (row.provider, request.provider),
    }
    return {k: v for k, v in pairs.items() if v[0] != v[1]}


async def claim_order(
    sessions: async_sessionmaker[AsyncSession],
    payment_id: str,
    request: CheckoutRequest | PaymentOrder,
    expires_at: datetime | None,
    merchant_id: str | None = None,
) -> tuple[Payment, bool]:
    """Insert the payment for this order, or return the existing one.

    Returns (row, created). Raises OrderConflict when the order exists with another
    amount, currency or provider. Safe under concurrency: the unique order id decides.
    """
    async with sessions() as session:
        existing = await session.scalar(select(Payment).where(Payment.order_id == request.order_id))
        if existing is None:
            row = Payment(
                payment_id=payment_id,
                order_id=request.order_id,
                merchant_id=merchant_id,
                provider=request.provider,
                amount_minor=request.amount_minor,
                currency=request.currency,
                subject=request.subject,
                customer_email=request.customer.email,
                customer_phone=request.customer.phone,
                client_ip=request.client_ip,
                device_id=request.device_id,
                status=PaymentStatus.CREATED.value,
                status_seq=0,
                expires_at=expires_at,
            )
            session.add(row)
            try:
                await session.commit()
                return row, True
            except IntegrityError:
                await session.rollback()
                existing = await session.scalar(select(Payment).where(Payment.order_id == request.order_id))
                if existing is None:
                    raise
        differences = _differences(existing, request)
        if differences:
            raise OrderConflict(request.order_id, differences)
        return existing, False


@dataclass(frozen=True)
class Applied:
    applied: bool  # the snapshot was newer than the stored one and was written
    finished: bool  # this write recorded the payment's outcome for the first time
    provider: str | None = None  # of the written row (for metrics), when applied
    created_at: datetime | None = None


async def apply_record(sessions: async_sessionmaker[AsyncSession], record: PaymentRecord) -> Applied:
    """Write the workflow's snapshot if it is newer than the stored one: one ``UPDATE`` on the
    table (plain SQL, which SQLAlchemy runs far cheaper than an ORM-enabled update). The first
    snapshot with an outcome also records the outcome and when it was reached."""
    values: dict[str, object] = record.model_dump(
        exclude={"payment_id", "seq", "event", "callback_received_at", "outcome"}, exclude_none=True
    )
    values["status"] = record.status.value
    payments = cast(Table, Payment.__table__)
    table = payments.c
    now = utcnow()
    if record.outcome is not None:
        # SET expressions read the row as it was, so both see whether it had finished before.
        values["outcome"] = case((table.finished_at.is_(None), record.outcome.value), else_=table.outcome)
        values["finished_at"] = func.coalesce(table.finished_at, literal(now, table.finished_at.type))
    async with sessions() as session:
        written = (
            await session.execute(
                update(payments)
                .where(table.payment_id == record.payment_id, table.status_seq < record.seq)
                .values(**values, status_seq=record.seq, updated_at=now)
                .returning(table.provider, table.created_at, table.finished_at)
            )
        ).first()
        await session.commit()
    if written is None:
        return Applied(False, False)
    finished = record.outcome is not None and written.finished_at == now
    return Applied(True, finished, written.provider, written.created_at)


async def count_retry(sessions: async_sessionmaker[AsyncSession], payment_id: str) -> None:
    async with sessions() as session:
        await session.execute(
            update(Payment).where(Payment.payment_id == payment_id).values(provider_retries=Payment.provider_retries + 1)
        )
        await session.commit()


async def recent_attempts(
    sessions: async_sessionmaker[AsyncSession],
    since: datetime,
    *,
    exclude: str,
    client_ip: str | None,
    device_id: str | None,
    customer_email: str | None,
) -> list[Payment]:
    """Payments since ``since`` from the same IP, device or customer (risk rules read these)."""
    matches = []
    if client_ip:
        matches.append(Payment.client_ip == client_ip)
    if device_id:
        matches.append(Payment.device_id == device_id)
    if customer_email:
        matches.append(Payment.customer_email == customer_email)
    if not matches:
        return []
    async with sessions() as session:
        query = select(Payment).where(Payment.created_at >= since, Payment.payment_id != exclude, or_(*matches))
        return list((await session.scalars(query)).all())
