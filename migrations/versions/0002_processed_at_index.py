"""Index processed_at, for retention pruning of the dedup table.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28
"""

from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_exactlyonce_processed_processed_at", "exactlyonce_processed", ["processed_at"])


def downgrade() -> None:
    op.drop_index("ix_exactlyonce_processed_processed_at", table_name="exactlyonce_processed")
