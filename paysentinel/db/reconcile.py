"""Reconciliation's writes: storing settlement rows and the differences a pass finds
(INSERT ... ON CONFLICT on PostgreSQL and SQLite alike)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import case, or_
from sqlalchemy.ext.asyncio import AsyncSession

from paysentinel.db.tables import Discrepancy


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
