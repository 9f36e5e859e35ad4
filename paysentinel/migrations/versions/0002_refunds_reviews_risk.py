"""refunds, reviews, and the payment columns risk rules and refunds need

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table("payments") as batch:
        batch.alter_column("status", type_=sa.String(24), existing_type=sa.String(16), existing_nullable=False)
        batch.add_column(sa.Column("refunded_minor", sa.BigInteger, nullable=False, server_default="0"))
        batch.add_column(sa.Column("client_ip", sa.String(45)))
        batch.add_column(sa.Column("device_id", sa.String(128)))
        batch.add_column(sa.Column("provider_retries", sa.Integer, nullable=False, server_default="0"))
    op.create_index("ix_payments_client_ip", "payments", ["client_ip"])
    op.create_index("ix_payments_device_id", "payments", ["device_id"])
    op.create_index("ix_payments_created_at", "payments", ["created_at"])

    op.create_table(
        "refunds",
        sa.Column("refund_id", sa.String(64), primary_key=True),
        sa.Column("payment_id", sa.String(80), nullable=False, index=True),
        sa.Column("order_id", sa.String(64), nullable=False, index=True),
        sa.Column("trade_no", sa.String(64), nullable=False),
        sa.Column("amount_minor", sa.BigInteger, nullable=False),
        sa.Column("currency", sa.String(3), nullable=False),
        sa.Column("status", sa.String(16), nullable=False, index=True),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("requested_by", sa.String(64), nullable=False),
        sa.Column("submissions", sa.Integer, nullable=False, server_default="0"),
        sa.Column("detail", sa.Text),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
    )
    op.create_table(
        "reviews",
        sa.Column("review_id", sa.String(100), primary_key=True),
        sa.Column("payment_id", sa.String(80), nullable=False, index=True),
        sa.Column("order_id", sa.String(64), nullable=False, index=True),
        sa.Column("reason", sa.String(32), nullable=False, index=True),
        sa.Column("evidence", sa.Text, nullable=False),
        sa.Column("status", sa.String(16), nullable=False, index=True),
        sa.Column("default_action", sa.String(16), nullable=False),
        sa.Column("deadline_at", TS),
        sa.Column("escalated_at", TS),
        sa.Column("action", sa.String(16)),
        sa.Column("decided_by", sa.String(64)),
        sa.Column("decision_reason", sa.Text),
        sa.Column("decided_at", TS),
        sa.Column("created_at", TS, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("reviews")
    op.drop_table("refunds")
    op.drop_index("ix_payments_created_at", "payments")
    op.drop_index("ix_payments_device_id", "payments")
    op.drop_index("ix_payments_client_ip", "payments")
    with op.batch_alter_table("payments") as batch:
        for column in ("provider_retries", "device_id", "client_ip", "refunded_minor"):
            batch.drop_column(column)
        batch.alter_column("status", type_=sa.String(16), existing_type=sa.String(24), existing_nullable=False)
