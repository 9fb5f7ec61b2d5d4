"""Count fingerprint mismatches per partition, like every other outcome.

A record whose ID (or sequence number) was processed before with another
payload ends dead-lettered, or as a duplicate under
``on_fingerprint_mismatch="skip"``; the mismatch itself was counted in the
runner's stats and metrics only. This column counts it in
``exactlyonce_counters`` too, in the transaction that decided it.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("exactlyonce_counters") as batch:
        batch.add_column(
            sa.Column("fingerprint_mismatches", sa.BigInteger(), nullable=False, server_default=sa.text("0"))
        )


def downgrade() -> None:
    with op.batch_alter_table("exactlyonce_counters") as batch:
        batch.drop_column("fingerprint_mismatches")
