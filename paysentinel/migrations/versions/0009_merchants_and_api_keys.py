"""merchants and their API keys; each payment belongs to a merchant

``merchants``: who may use the checkout API. ``api_keys``: a merchant's keys, stored only as
the SHA-256 of their secret, with scopes (payments, refunds, read) and when they were revoked.
``payments.merchant_id``: the merchant that started the payment (empty for payments made
before merchants existed: no merchant can read or refund those through the checkout API).

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-23
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "merchants",
        sa.Column("merchant_id", sa.String(16), primary_key=True),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("created_at", TS, nullable=False),
    )
    op.create_table(
        "api_keys",
        sa.Column("key_id", sa.String(32), primary_key=True),
        sa.Column("merchant_id", sa.String(16), sa.ForeignKey("merchants.merchant_id"), nullable=False, index=True),
        sa.Column("secret_sha256", sa.String(64), nullable=False),
        sa.Column("scopes", sa.String(64), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("revoked_at", TS),
    )
    with op.batch_alter_table("payments") as batch:
        batch.add_column(sa.Column("merchant_id", sa.String(16)))
        batch.create_index("ix_payments_merchant_id", ["merchant_id"])


def downgrade() -> None:
    with op.batch_alter_table("payments") as batch:
        batch.drop_index("ix_payments_merchant_id")
        batch.drop_column("merchant_id")
    op.drop_table("api_keys")
    op.drop_table("merchants")
