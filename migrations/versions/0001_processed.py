"""The dedup table: one row per (scope, message ID) handled.

Revision ID: 0001
Revises:
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from exactlyonce.storage.schema import ExactString

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "exactlyonce_processed",
        # Compared byte for byte (a binary collation on MySQL/MariaDB).
        sa.Column("scope", ExactString(200), nullable=False),
        sa.Column("message_id", ExactString(255), nullable=False),
        sa.Column("topic", sa.String(249), nullable=False),
        sa.Column("kafka_partition", sa.Integer(), nullable=False),
        sa.Column("kafka_offset", sa.BigInteger(), nullable=False),
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("processed_at", sa.DateTime(timezone=False), nullable=False),
        sa.PrimaryKeyConstraint("scope", "message_id", name="pk_exactlyonce_processed"),
    )


def downgrade() -> None:
    op.drop_table("exactlyonce_processed")
