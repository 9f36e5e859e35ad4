"""Application database: payments and the provider callbacks we received.

SQLAlchemy 2 async; SQLite (aiosqlite) by default, PostgreSQL (asyncpg) in production.
The schema is owned by Alembic (``paysentinel db upgrade``). This database is never
Temporal's own persistence.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Optional, cast

from sqlalchemy.engine import make_url
from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Float,
    Integer,
    String,
    Table,
    Text,
    TypeDecorator,
    UniqueConstraint,
    case,
    func,
    or_,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from paysentinel.models import CheckoutRequest, PaymentOrder, PaymentRecord, PaymentStatus, RefundRecord


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator[datetime]):
    """Timestamps are stored and returned in UTC, also on SQLite (which drops the zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: Optional[datetime], dialect) -> Optional[datetime]:
        if value is None:
            return None
        return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)

    def process_result_value(self, value: Optional[datetime], dialect) -> Optional[datetime]:
        if value is None:
            return None
        return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


class Base(DeclarativeBase):
    pass


class Payment(Base):
    __tablename__ = "payments"

    payment_id: Mapped[str] = mapped_column(String(80), primary_key=True)
    order_id: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    provider: Mapped[str] = mapped_column(String(32))
    amount_minor: Mapped[int] = mapped_column(BigInteger)
    currency: Mapped[str] = mapped_column(String(3))
    subject: Mapped[str] = mapped_column(String(128), default="")
    customer_email: Mapped[Optional[str]] = mapped_column(String(254))
    customer_phone: Mapped[Optional[str]] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(24), index=True)
    status_seq: Mapped[int] = mapped_column(BigInteger, default=0)
    trade_no: Mapped[Optional[str]] = mapped_column(String(64))
    pay_url: Mapped[Optional[str]] = mapped_column(Text)
    reason: Mapped[Optional[str]] = mapped_column(Text)
    review_reason: Mapped[Optional[str]] = mapped_column(String(64))
    paid_amount_minor: Mapped[Optional[int]] = mapped_column(BigInteger)
    refunded_minor: Mapped[int] = mapped_column(BigInteger, default=0)
    client_ip: Mapped[Optional[str]] = mapped_column(String(45), index=True)
    device_id: Mapped[Optional[str]] = mapped_column(String(128), index=True)
    # The merchant whose API key started it; ``order_id`` is then "<merchant>-<merchant's order>".
    merchant_id: Mapped[Optional[str]] = mapped_column(String(16), index=True)
    # Provider calls that had to be retried (transient errors), over the payment's life.
    provider_retries: Mapped[int] = mapped_column(Integer, default=0)
    # The lifecycle's outcome (SUCCEEDED, FAILED, CLOSED) and when it was reached.
    outcome: Mapped[Optional[str]] = mapped_column(String(16))
    finished_at: Mapped[Optional[datetime]] = mapped_column(UTCDateTime(), index=True)
    paid_at: Mapped[Optional[datetime]] = mapped_column(UTCDateTime())
    expires_at: Mapped[Optional[datetime]] = mapped_column(UTCDateTime())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)


class Merchant(Base):
    """Who may use the checkout API (through its API keys)."""

    __tablename__ = "merchants"

    merchant_id: Mapped[str] = mapped_column(String(16), primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class ApiKey(Base):
    """A merchant's API key: only the SHA-256 of its secret is stored."""

    __tablename__ = "api_keys"

    key_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    merchant_id: Mapped[str] = mapped_column(String(16), index=True)
    secret_sha256: Mapped[str] = mapped_column(String(64))
    scopes: Mapped[str] = mapped_column(String(64))  # comma-separated, of API_SCOPES
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    revoked_at: Mapped[Optional[datetime]] = mapped_column(UTCDateTime())

    @property
    def scope_list(self) -> list[str]:
        return [scope for scope in self.scopes.split(",") if scope]


class Callback(Base):
    """Every verified provider callback, stored before it is acknowledged."""

    __tablename__ = "callbacks"
    __table_args__ = (UniqueConstraint("provider", "event_id", name="uq_callbacks_provider_event"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    provider: Mapped[str] = mapped_column(String(32))
    event_id: Mapped[str] = mapped_column(String(128))
    order_id: Mapped[Optional[str]] = mapped_column(String(64), index=True)
    payment_id: Mapped[Optional[str]] = mapped_column(String(80), index=True)
    trade_status: Mapped[Optional[str]] = mapped_column(String(32))
    raw_body: Mapped[str] = mapped_column(Text)
    signature_verified: Mapped[bool] = mapped_column(Boolean)
    # pending -> delivered | unknown_payment | payment_completed
    delivery: Mapped[str] = mapped_column(String(24), default="pending", index=True)
    delivery_error: Mapped[Optional[str]] = mapped_column(Text)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    delivered_at: Mapped[Optional[datetime]] = mapped_column(UTCDateTime())


class Refund(Base):
    """One refund of one paid trade; ``refund_id`` is the provider's out_request_no."""

    __tablename__ = "refunds"

    refund_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    payment_id: Mapped[str] = mapped_column(String(80), index=True)
    order_id: Mapped[str] = mapped_column(String(64), index=True)
    trade_no: Mapped[str] = mapped_column(String(64))
    amount_minor: Mapped[int] = mapped_column(BigInteger)
    currency: Mapped[str] = mapped_column(String(3))
    status: Mapped[str] = mapped_column(String(16), index=True)
    reason: Mapped[str] = mapped_column(Text)
    requested_by: Mapped[str] = mapped_column(String(64))
    submissions: Mapped[int] = mapped_column(Integer, default=0)
    detail: Mapped[Optional[str]] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)


class Review(Base):
    """A manual review: why it was opened, the evidence, and who decided what and why."""

    __tablename__ = "reviews"

    review_id: Mapped[str] = mapped_column(String(100), primary_key=True)
    payment_id: Mapped[str] = mapped_column(String(80), index=True)
    order_id: Mapped[str] = mapped_column(String(64), index=True)
    reason: Mapped[str] = mapped_column(String(32), index=True)
    evidence: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), index=True)  # OPEN, ESCALATED, DECIDED
    default_action: Mapped[str] = mapped_column(String(16))
    deadline_at: Mapped[Optional[datetime]] = mapped_column(UTCDateTime())
    escalated_at: Mapped[Optional[datetime]] = mapped_column(UTCDateTime())
    action: Mapped[Optional[str]] = mapped_column(String(16))
    decided_by: Mapped[Optional[str]] = mapped_column(String(64))
    decision_reason: Mapped[Optional[str]] = mapped_column(Text)
    decided_at: Mapped[Optional[datetime]] = mapped_column(UTCDateTime())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class Notification(Base):
    """One notification per event and channel: the row makes a retried send a no-op."""

    __tablename__ = "notifications"

    key: Mapped[str] = mapped_column(String(200), primary_key=True)  # event key + ":" + channel
    payment_id: Mapped[str] = mapped_column(String(80), index=True)
    kind: Mapped[str] = mapped_column(String(24))
    channel: Mapped[str] = mapped_column(String(16))  # email, webhook
    target: Mapped[str] = mapped_column(Text)
    subject: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16))  # sending, sent
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[Optional[str]] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    sent_at: Mapped[Optional[datetime]] = mapped_column(UTCDateTime())


class Alert(Base):
    """An incident raised by the monitor: one open row per monitor and kind at a time."""

    __tablename__ = "alerts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    monitor: Mapped[str] = mapped_column(String(64), index=True)
    kind: Mapped[str] = mapped_column(String(32))  # failure_rate, timeout_rate
    status: Mapped[str] = mapped_column(String(16), index=True)  # OPEN, RESOLVED
    rate: Mapped[float] = mapped_column(Float)  # the rate that opened it
    peak_rate: Mapped[float] = mapped_column(Float)
    threshold: Mapped[float] = mapped_column(Float)
    payments: Mapped[int] = mapped_column(Integer)  # finished payments in the window that opened it
    detail: Mapped[str] = mapped_column(Text, default="")
    opened_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    resolved_at: Mapped[Optional[datetime]] = mapped_column(UTCDateTime())


class SettlementRowRecord(Base):
    """One row of a provider's settlement bill, loaded for reconciliation."""

    __tablename__ = "settlement_rows"
    __table_args__ = (UniqueConstraint("provider", "bill_date", "kind", "trade_no", "refund_no"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    provider: Mapped[str] = mapped_column(String(32))
    bill_date: Mapped[str] = mapped_column(String(10))  # YYYY-MM-DD
    kind: Mapped[str] = mapped_column(String(8))  # payment, refund
    trade_no: Mapped[str] = mapped_column(String(64))
    order_id: Mapped[str] = mapped_column(String(64), index=True)
    refund_no: Mapped[str] = mapped_column(String(64), default="")
    amount_minor: Mapped[int] = mapped_column(BigInteger)
    currency: Mapped[str] = mapped_column(String(3))
    at: Mapped[datetime] = mapped_column(UTCDateTime())


class ReconciliationRun(Base):
    """One provider's reconciliation of one day: the report finance reads."""

    __tablename__ = "reconciliation_runs"

    run_id: Mapped[str] = mapped_column(String(64), primary_key=True)  # provider:YYYY-MM-DD
    provider: Mapped[str] = mapped_column(String(32))
    bill_date: Mapped[str] = mapped_column(String(10), index=True)
    status: Mapped[str] = mapped_column(String(16))  # RUNNING, DONE, PROVISIONAL (the day was not over), FAILED
    rows: Mapped[int] = mapped_column(Integer, default=0)
    matched: Mapped[int] = mapped_column(Integer, default=0)
    day_boundary: Mapped[int] = mapped_column(Integer, default=0)
    classes: Mapped[str] = mapped_column(Text, default="{}")  # JSON: kind -> count, amount, unresolved
    unresolved: Mapped[int] = mapped_column(Integer, default=0)
    passes: Mapped[int] = mapped_column(Integer, default=0)  # how many times the day was reconciled
    error: Mapped[Optional[str]] = mapped_column(Text)  # why the last run failed (FAILED)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    finished_at: Mapped[Optional[datetime]] = mapped_column(UTCDateTime())


class Discrepancy(Base):
    """A difference found by reconciliation, and what was done about it (once)."""

    __tablename__ = "discrepancies"
    __table_args__ = (UniqueConstraint("run_id", "kind", "order_id", "trade_no", "refund_no"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(String(64), index=True)
    kind: Mapped[str] = mapped_column(String(32))
    order_id: Mapped[str] = mapped_column(String(64))
    trade_no: Mapped[str] = mapped_column(String(64), default="")
    refund_no: Mapped[str] = mapped_column(String(64), default="")
    provider_amount_minor: Mapped[Optional[int]] = mapped_column(BigInteger)
    our_amount_minor: Mapped[Optional[int]] = mapped_column(BigInteger)
    currency: Mapped[str] = mapped_column(String(3))
    detail: Mapped[str] = mapped_column(Text)
    resolution: Mapped[Optional[str]] = mapped_column(Text)
    resolved: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    resolved_at: Mapped[Optional[datetime]] = mapped_column(UTCDateTime())
    # The run's pass that last found it in the bill (a difference a corrected bill no longer
    # shows is over); None for differences found before passes were noted.
    seen_pass: Mapped[Optional[int]] = mapped_column(Integer)


class AuditEntry(Base):
    """One operator action: who (and as which role), when, from where, what, why, and the result.

    Append-only: rows are only ever inserted (``record_audit``); the database refuses
    UPDATE and DELETE on this table (migration 0008).
    """

    __tablename__ = "audit"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, index=True)
    operator: Mapped[str] = mapped_column(String(64), index=True)
    role: Mapped[str] = mapped_column(String(16))
    address: Mapped[str] = mapped_column(String(64))
    action: Mapped[str] = mapped_column(String(32))  # e.g. review.refund, reconcile.run
    target: Mapped[str] = mapped_column(String(128))  # the review id, the day reconciled
    reason: Mapped[str] = mapped_column(Text, default="")
    result: Mapped[str] = mapped_column(String(16))  # done, pending, refused
    detail: Mapped[str] = mapped_column(Text, default="")


class PendingDecision(Base):
    """A review decision above the four-eyes amount, waiting for a second, different approver."""

    __tablename__ = "pending_decisions"

    review_id: Mapped[str] = mapped_column(String(100), primary_key=True)
    action: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(Text)
    operator: Mapped[str] = mapped_column(String(64))
    role: Mapped[str] = mapped_column(String(16))
    amount_minor: Mapped[int] = mapped_column(BigInteger)
    currency: Mapped[str] = mapped_column(String(3))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


async def record_audit(sessions: async_sessionmaker[AsyncSession], **values: object) -> None:
    """Append one row to the audit table (the only way the application writes to it)."""
    async with sessions() as session, session.begin():
        session.add(AuditEntry(**values))


STALE = "no longer a difference: the bill as the provider serves it now agrees"


def _dialect_insert(session: AsyncSession) -> Any:
    """The INSERT with ON CONFLICT of the session's database (PostgreSQL or SQLite)."""
    from sqlalchemy.dialects import postgresql, sqlite

    return postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert


def upsert_findings(session: AsyncSession, rows: list[dict]):
    """Store differences found by a pass: new ones inserted; one stored already keeps what
    was done about it and is marked seen by this pass (and, if nothing was done yet, takes
    the bill's figures as they are now)."""
    insert = _dialect_insert(session)
    table = Discrepancy.__table__
    statement = insert(table)
    untouched = or_(table.c.resolution.is_(None), table.c.resolution == STALE)

    def fresh(column: str):
        return case((untouched, statement.excluded[column]), else_=table.c[column])

    return session.execute(
        statement.on_conflict_do_update(
            index_elements=["run_id", "kind", "order_id", "trade_no", "refund_no"],
            set_={
                "seen_pass": statement.excluded.seen_pass,
                **{
                    c: fresh(c)
                    for c in (
                        "provider_amount_minor",
                        "our_amount_minor",
                        "currency",
                        "detail",
                        "resolution",
                        "resolved",
                        "resolved_at",
                    )
                },
            },
        ),
        rows,
    )


def insert_ignoring_duplicates(session: AsyncSession, table, rows: list[dict]):
    """INSERT ... ON CONFLICT DO NOTHING, on PostgreSQL and SQLite alike."""
    insert = _dialect_insert(session)
    return session.execute(insert(table).on_conflict_do_nothing(), rows)


def make_engine(url: str, *, pre_ping: bool = True) -> AsyncEngine:
    """The engine for the application database. ``pre_ping``: test each pooled connection with
    a round trip before use (callers that retry on a dropped connection, like activities, can
    skip it). A PostgreSQL server on this machine is reached without TLS unless the URL asks
    for it (``sslmode``/``ssl``): encrypting loopback traffic costs CPU and protects nothing."""
    if url.startswith("sqlite"):
        Path(url.split("///", 1)[1]).parent.mkdir(parents=True, exist_ok=True)
        return create_async_engine(url, connect_args={"timeout": 30})
    connect_args: dict[str, object] = {}
    parsed = make_url(url)
    if parsed.host in LOOPBACK_HOSTS and not {"ssl", "sslmode"} & set(parsed.query):
        connect_args["ssl"] = False
    return create_async_engine(
        url, pool_size=10, max_overflow=10, pool_pre_ping=pre_ping, pool_recycle=1800, connect_args=connect_args
    )


LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})


def make_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False)


def upgrade(url: str) -> None:
    """Bring the schema to the newest Alembic revision (sync; call before serving)."""
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    config.set_main_option("sqlalchemy.url", url)
    if url.startswith("sqlite"):
        Path(url.split("///", 1)[1]).parent.mkdir(parents=True, exist_ok=True)
    command.upgrade(config, "head")


# --- Queries used by more than one part -----------------------------------------------


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
    """Write the workflow's snapshot if it is newer than the stored one (one transaction; plain
    SQL statements on the table, which SQLAlchemy runs far cheaper than ORM-enabled updates)."""
    values = record.model_dump(exclude={"payment_id", "seq", "event", "callback_received_at", "outcome"}, exclude_none=True)
    values["status"] = record.status.value
    payments = cast(Table, Payment.__table__)
    table = payments.c
    async with sessions() as session:
        written = (
            await session.execute(
                update(payments)
                .where(table.payment_id == record.payment_id, table.status_seq < record.seq)
                .values(**values, status_seq=record.seq, updated_at=utcnow())
                .returning(table.provider, table.created_at)
            )
        ).first()
        finished = False
        if written is not None and record.outcome is not None:
            result = await session.execute(
                update(payments)
                .where(table.payment_id == record.payment_id, table.finished_at.is_(None))
                .values(outcome=record.outcome.value, finished_at=utcnow())
            )
            finished = getattr(result, "rowcount", 0) == 1  # an UPDATE's result is a CursorResult
        await session.commit()
    if written is None:
        return Applied(False, False)
    return Applied(True, finished, written.provider, written.created_at)


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


# --- What the monitor and /metrics read ----------------------------------------------

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
