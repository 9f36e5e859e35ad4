"""payment outcomes for the monitor's rates, and the monitor's incidents

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table("payments") as batch:
        batch.add_column(sa.Column("outcome", sa.String(16)))
        batch.add_column(sa.Column("finished_at", TS))
        batch.create_index("ix_payments_finished_at", ["finished_at"])
    op.create_table(
        "alerts",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("monitor", sa.String(64), nullable=False, index=True),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("status", sa.String(16), nullable=False, index=True),
        sa.Column("rate", sa.Float, nullable=False),
        sa.Column("peak_rate", sa.Float, nullable=False),
        sa.Column("threshold", sa.Float, nullable=False),
        sa.Column("payments", sa.Integer, nullable=False),
        sa.Column("detail", sa.Text, nullable=False, server_default=""),
        sa.Column("opened_at", TS, nullable=False),
        sa.Column("resolved_at", TS),
    )


def downgrade() -> None:
    op.drop_table("alerts")
    with op.batch_alter_table("payments") as batch:
        batch.drop_index("ix_payments_finished_at")
        batch.drop_column("finished_at")
        batch.drop_column("outcome")
