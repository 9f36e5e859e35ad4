"""reconciliation: which pass of a day last found each difference

A day reconciled again loads the bill as the provider serves it now; a difference the
corrected bill no longer shows is over. ``discrepancies.seen_pass`` is the run's pass
that last found it.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-23
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("discrepancies") as batch:
        batch.add_column(sa.Column("seen_pass", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("discrepancies") as batch:
        batch.drop_column("seen_pass")
