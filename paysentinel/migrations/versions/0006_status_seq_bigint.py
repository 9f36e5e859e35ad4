"""payment snapshots ordered by the workflow's clock: status_seq becomes a 64-bit number

A payment's snapshot order is (workflow time in microseconds, transition number), which
keeps growing across a workflow reset and a continue-as-new; it needs 64 bits.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-23
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("payments") as batch:
        batch.alter_column("status_seq", type_=sa.BigInteger(), existing_type=sa.Integer())


def downgrade() -> None:
    with op.batch_alter_table("payments") as batch:
        batch.alter_column("status_seq", type_=sa.Integer(), existing_type=sa.BigInteger())
