"""Application database: payments and the provider callbacks we received.

SQLAlchemy 2 async; SQLite (aiosqlite) by default, PostgreSQL (asyncpg) in production.
The schema is owned by Alembic (``paysentinel db upgrade``). This database is never
Temporal's own persistence.

Its modules, whose names are all importable from here:

- ``tables``: the tables (ORM classes) and UTC timestamps
- ``engine``: engines, sessions and schema upgrades
- ``payments``: claiming orders, the workflow's snapshots, risk rule lookups
- ``refunds``: refunds, manual reviews and the audit trail
- ``monitor``: what the monitor and /metrics read
- ``reconcile``: settlement rows and differences found by reconciliation
"""

from paysentinel.db.tables import (
    utcnow,
    UTCDateTime,
    Base,
    Payment,
    Merchant,
    ApiKey,
    Callback,
    Refund,
    Review,
    Notification,
    Alert,
    SettlementRowRecord,
    ReconciliationRun,
    Discrepancy,
    AuditEntry,
    PendingDecision,
)
from paysentinel.db.engine import (
    make_engine,
    LOOPBACK_HOSTS,
    make_sessionmaker,
    upgrade,
)
from paysentinel.db.payments import (
    OrderConflict,
    claim_order,
    Applied,
    apply_record,
    count_retry,
    recent_attempts,
)
from paysentinel.db.refunds import (
    save_refund,
    save_review,
    record_audit,
)
from paysentinel.db.monitor import (
    STUCK_GRACE_SECONDS,
    REFUND_PROCESSING_LIMIT_SECONDS,
    open_figures,
    StuckRows,
    stuck_rows,
    outcomes_since,
    track_incident,
    notification_sent,
)
from paysentinel.db.reconcile import (
    STALE,
    upsert_findings,
    insert_ignoring_duplicates,
)

__all__ = [
    "utcnow",
    "UTCDateTime",
    "Base",
    "Payment",
    "Merchant",
    "ApiKey",
    "Callback",
    "Refund",
    "Review",
    "Notification",
    "Alert",
    "SettlementRowRecord",
    "ReconciliationRun",
    "Discrepancy",
    "AuditEntry",
    "PendingDecision",
    "make_engine",
    "LOOPBACK_HOSTS",
    "make_sessionmaker",
    "upgrade",
    "OrderConflict",
    "claim_order",
    "Applied",
    "apply_record",
    "count_retry",
    "recent_attempts",
    "save_refund",
    "save_review",
    "record_audit",
    "STUCK_GRACE_SECONDS",
    "REFUND_PROCESSING_LIMIT_SECONDS",
    "open_figures",
    "StuckRows",
    "stuck_rows",
    "outcomes_since",
    "track_incident",
    "notification_sent",
    "STALE",
    "upsert_findings",
    "insert_ignoring_duplicates",
]
