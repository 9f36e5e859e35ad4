"""reconciliation: settlement rows, runs and discrepancies

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-23
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "settlement_rows",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("provider", sa.String(32), nullable=False),
        sa.Column("bill_date", sa.String(10), nullable=False),
        sa.Column("kind", sa.String(8), nullable=False),
        sa.Column("trade_no", sa.String(64), nullable=False),
        sa.Column("order_id", sa.String(64), nullable=False, index=True),
        sa.Column("refund_no", sa.String(64), nullable=False, server_default=""),
        sa.Column("amount_minor", sa.BigInteger, nullable=False),
        sa.Column("currency", sa.String(3), nullable=False),
        sa.Column("at", TS, nullable=False),
        sa.UniqueConstraint("provider", "bill_date", "kind", "trade_no", "refund_no"),
    )
    op.create_table(
        "reconciliation_runs",
        sa.Column("run_id", sa.String(64), primary_key=True),
        sa.Column("provider", sa.String(32), nullable=False),
        sa.Column("bill_date", sa.String(10), nullable=False, index=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("rows", sa.Integer, nullable=False, server_default="0"),
        sa.Column("matched", sa.Integer, nullable=False, server_default="0"),
        sa.Column("day_boundary", sa.Integer, nullable=False, server_default="0"),
        sa.Column("classes", sa.Text, nullable=False, server_default="{}"),
        sa.Column("unresolved", sa.Integer, nullable=False, server_default="0"),
        sa.Column("passes", sa.Integer, nullable=False, server_default="0"),
        sa.Column("error", sa.Text),
        sa.Column("started_at", TS, nullable=False),
        sa.Column("finished_at", TS),
    )
    op.create_table(
        "discrepancies",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("run_id", sa.String(64), nullable=False, index=True),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("order_id", sa.String(64), nullable=False),
        sa.Column("trade_no", sa.String(64), nullable=False, server_default=""),
        sa.Column("refund_no", sa.String(64), nullable=False, server_default=""),
        sa.Column("provider_amount_minor", sa.BigInteger),
        sa.Column("our_amount_minor", sa.BigInteger),
        sa.Column("currency", sa.String(3), nullable=False),
        sa.Column("detail", sa.Text, nullable=False),
        sa.Column("resolution", sa.Text),
        sa.Column("resolved", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("resolved_at", TS),
        sa.UniqueConstraint("run_id", "kind", "order_id", "trade_no", "refund_no"),
    )
    with op.batch_alter_table("payments") as batch:
        batch.create_index("ix_payments_paid_at", ["paid_at"])


def downgrade() -> None:
    with op.batch_alter_table("payments") as batch:
        batch.drop_index("ix_payments_paid_at")
    op.drop_table("discrepancies")
    op.drop_table("reconciliation_runs")
    op.drop_table("settlement_rows")
