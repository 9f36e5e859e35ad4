"""payments and callbacks

Revision ID: 0001
Revises:
Create Date: 2026-11-22
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "payments",
        sa.Column("payment_id", sa.String(80), primary_key=True),
        sa.Column("order_id", sa.String(64), nullable=False),
        sa.Column("provider", sa.String(32), nullable=False),
        sa.Column("amount_minor", sa.BigInteger, nullable=False),
        sa.Column("currency", sa.String(3), nullable=False),
        sa.Column("subject", sa.String(128), nullable=False, server_default=""),
        sa.Column("customer_email", sa.String(254)),
        sa.Column("customer_phone", sa.String(32)),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("status_seq", sa.Integer, nullable=False, server_default="0"),
        sa.Column("trade_no", sa.String(64)),
        sa.Column("pay_url", sa.Text),
        sa.Column("reason", sa.Text),
        sa.Column("review_reason", sa.String(64)),
        sa.Column("paid_amount_minor", sa.BigInteger),
        sa.Column("paid_at", TS),
        sa.Column("expires_at", TS),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
    )
    op.create_index("ix_payments_order_id", "payments", ["order_id"], unique=True)
    op.create_index("ix_payments_status", "payments", ["status"])
    op.create_table(
        "callbacks",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
        sa.Column("provider", sa.String(32), nullable=False),
        sa.Column("event_id", sa.String(128), nullable=False),
        sa.Column("order_id", sa.String(64)),
        sa.Column("payment_id", sa.String(80)),
        sa.Column("trade_status", sa.String(32)),
        sa.Column("raw_body", sa.Text, nullable=False),
        sa.Column("signature_verified", sa.Boolean, nullable=False),
        sa.Column("delivery", sa.String(24), nullable=False),
        sa.Column("delivery_error", sa.Text),
        sa.Column("received_at", TS, nullable=False),
        sa.Column("delivered_at", TS),
        sa.UniqueConstraint("provider", "event_id", name="uq_callbacks_provider_event"),
    )
    op.create_index("ix_callbacks_order_id", "callbacks", ["order_id"])
    op.create_index("ix_callbacks_payment_id", "callbacks", ["payment_id"])
    op.create_index("ix_callbacks_delivery", "callbacks", ["delivery"])


def downgrade() -> None:
    op.drop_table("callbacks")
    op.drop_table("payments")
