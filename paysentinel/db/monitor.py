"""What the monitor and /metrics read: waiting and stuck payments, outcomes, incidents, and
whether a notification went out."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Optional

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from paysentinel.db.tables import Alert, Notification, Payment, Refund, Review, utcnow


STUCK_GRACE_SECONDS = 300  # default of PAYSENTINEL_STUCK_GRACE_SECONDS
REFUND_PROCESSING_LIMIT_SECONDS = 3 * 86400  # default of PAYSENTINEL_REFUND_PROCESSING_LIMIT_SECONDS


async def open_figures(
    sessions: async_sessionmaker[AsyncSession], *, grace_seconds: float = STUCK_GRACE_SECONDS
) -> dict[str, float]:
    """Payments still waiting, stuck ones (past their time to live by ``grace_seconds``),
    open reviews and the oldest review's age."""
    now = utcnow()
    waiting = Payment.status.in_(("CREATED", "PENDING"))
    async with sessions() as session:
        pending = await session.scalar(select(func.count()).where(waiting))
        stuck = await session.scalar(
            select(func.count()).where(waiting, Payment.expires_at < now - timedelta(seconds=grace_seconds))
        )
        reviews, oldest = (
            await session.execute(
                select(func.count(), func.min(Review.created_at)).where(Review.status.in_(("OPEN", "ESCALATED")))
            )
        ).one()
    if oldest is not None and oldest.tzinfo is None:
        oldest = oldest.replace(tzinfo=timezone.utc)
    return {
        "pending": pending or 0,
        "stuck": stuck or 0,
        "open_reviews": reviews or 0,
        "oldest_review_seconds": (now - oldest).total_seconds() if oldest else 0.0,
    }


@dataclass(frozen=True)
class StuckRows:
    """What the database alone says may be stuck; payment ids, oldest first."""

    open_past_ttl: list[str]  # CREATED / PENDING past their time to live by the grace
    refunding: list[str]  # REFUNDING, unchanged for longer than the grace (stuck if no child runs)
    in_review: list[str]  # IN_REVIEW, unchanged for longer than the grace (stuck if no child runs)
    refunds_too_long: list[tuple[str, str]]  # (refund id, payment id) PROCESSING longer than the limit


async def stuck_rows(
    sessions: async_sessionmaker[AsyncSession],
    *,
    grace_seconds: float = STUCK_GRACE_SECONDS,
    refund_processing_limit_seconds: float = REFUND_PROCESSING_LIMIT_SECONDS,
) -> StuckRows:
    now = utcnow()
    settled_before = now - timedelta(seconds=grace_seconds)
    async with sessions() as session:

        async def payments(*where) -> list[str]:
            query = select(Payment.payment_id).where(*where).order_by(Payment.updated_at, Payment.payment_id)
            return list((await session.scalars(query)).all())

        open_past_ttl = await payments(Payment.status.in_(("CREATED", "PENDING")), Payment.expires_at < settled_before)
        refunding = await payments(Payment.status == "REFUNDING", Payment.updated_at < settled_before)
        in_review = await payments(Payment.status == "IN_REVIEW", Payment.updated_at < settled_before)
        refunds = await session.execute(
            select(Refund.refund_id, Refund.payment_id)
            .where(Refund.status == "PROCESSING", Refund.created_at < now - timedelta(seconds=refund_processing_limit_seconds))
            .order_by(Refund.created_at, Refund.refund_id)
        )
        return StuckRows(open_past_ttl, refunding, in_review, [(r, p) for r, p in refunds.all()])


async def outcomes_since(sessions: async_sessionmaker[AsyncSession], since: datetime) -> dict[str, int]:
    """Outcome -> number of payments that reached it since ``since``."""
    async with sessions() as session:
        rows = await session.execute(
            select(Payment.outcome, func.count()).where(Payment.finished_at >= since).group_by(Payment.outcome)
        )
        return {outcome: count for outcome, count in rows.all() if outcome is not None}


async def track_incident(
    sessions: async_sessionmaker[AsyncSession],
    monitor: str,
    kind: str,
    *,
    breach: bool,
    rate: float,
    threshold: float,
    payments: int,
    detail: str,
) -> Optional[Alert]:
    """Open an incident on a breach (one per monitor and kind), resolve it when over.

    Returns the newest incident of this monitor and kind (open, or resolved), or None.
    Running it twice with the same figures changes nothing the second time."""
    async with sessions() as session:
        current = await session.scalar(
            select(Alert).where(Alert.monitor == monitor, Alert.kind == kind).order_by(Alert.id.desc()).limit(1)
        )
        if current is not None and current.status == "RESOLVED":
            if not breach:
                return current
            current = None
        if current is None and breach:
            current = Alert(
                monitor=monitor,
                kind=kind,
                status="OPEN",
                rate=rate,
                peak_rate=rate,
                threshold=threshold,
                payments=payments,
                detail=detail,
                opened_at=utcnow(),
            )
            session.add(current)
        elif current is not None and breach:
            current.peak_rate = max(current.peak_rate, rate)
        elif current is not None:
            current.status, current.resolved_at = "RESOLVED", utcnow()
        await session.commit()
        return current


async def notification_sent(sessions: async_sessionmaker[AsyncSession], key: str) -> bool:
    """Whether the message with this event key went out on every channel it was claimed for."""
    async with sessions() as session:
        rows = (await session.scalars(select(Notification).where(Notification.key.like(f"{key}:%")))).all()
    return bool(rows) and all(row.status == "sent" for row in rows)
