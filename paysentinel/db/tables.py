"""The application database's tables (SQLAlchemy ORM classes) and its UTC timestamps.

The schema is owned by Alembic (paysentinel/migrations); ``Base.metadata`` is what the
migrations compare against.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Optional

from sqlalchemy import BigInteger, Boolean, DateTime, Float, Integer, String, Text, TypeDecorator, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


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
