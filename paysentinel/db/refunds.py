"""Queries on refunds, manual reviews and the operators' audit trail."""

from __future__ import annotations

from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from paysentinel.models import PaymentStatus, RefundRecord
from paysentinel.db.tables import AuditEntry, Payment, Refund, Review, utcnow


async def save_refund(sessions: async_sessionmaker[AsyncSession], record: RefundRecord) -> None:
    """Insert or update a refund row (idempotent: the refund id is the key).

    A reconciliation refund (its own RefundWorkflow, the payment's workflow has finished)
    books its money on the payment row in the same transaction, once: the refunded
    trade's capture and the refund."""
    async with sessions() as session:
        row = await session.get(Refund, record.refund_id, with_for_update=True)
        succeeded_now = record.status.value == "SUCCEEDED" and (row is None or row.status != "SUCCEEDED")
        if row is None:
            row = Refund(refund_id=record.refund_id)
            session.add(row)
        for key, value in record.model_dump().items():
            setattr(row, key, value.value if key == "status" else value)
        if succeeded_now and record.requested_by == "reconciliation":
            await _book_reconciliation_refund(session, record)
        try:
            await session.commit()
        except IntegrityError:  # a concurrent insert of the same refund: update it instead
            await session.rollback()
            await save_refund(sessions, record)


async def _book_reconciliation_refund(session: AsyncSession, record: RefundRecord) -> None:
    payment = await session.get(Payment, record.payment_id, with_for_update=True)
    if payment is None:  # an order we never had: no payment row to correct
        return
    paid = payment.paid_amount_minor
    if paid is None or payment.trade_no != record.trade_no:  # a capture the row does not count yet
        paid = (paid or 0) + record.amount_minor
    payment.paid_amount_minor = paid
    payment.refunded_minor = (payment.refunded_minor or 0) + record.amount_minor
    if payment.refunded_minor >= paid:
        payment.status = PaymentStatus.REFUNDED.value
    payment.updated_at = utcnow()


async def save_review(sessions: async_sessionmaker[AsyncSession], review_id: str, **values: object) -> None:
    """Insert or update a review row."""
    async with sessions() as session:
        row = await session.get(Review, review_id)
        if row is None:
            row = Review(review_id=review_id)
            session.add(row)
        for key, value in values.items():
            setattr(row, key, value)
        await session.commit()


async def record_audit(sessions: async_sessionmaker[AsyncSession], **values: object) -> None:
    """Append one row to the audit table (the only way the application writes to it)."""
    async with sessions() as session, session.begin():
        session.add(AuditEntry(**values))
