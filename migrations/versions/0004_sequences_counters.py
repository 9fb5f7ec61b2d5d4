"""Sequenced handlers (a watermark per stream, parked messages) and per-partition counters.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

from exactlyonce.storage.schema import ExactString

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

_BLOB = sa.LargeBinary().with_variant(mysql.LONGBLOB(), "mysql", "mariadb")


def upgrade() -> None:
    op.create_table(
        "exactlyonce_sequence_streams",
        sa.Column("scope", ExactString(200), nullable=False),
        sa.Column("stream", ExactString(255), nullable=False),
        sa.Column("watermark", sa.BigInteger(), nullable=False),
        sa.Column("parked", sa.Integer(), nullable=False),
        sa.Column("gap_since", sa.DateTime(timezone=False), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=False), nullable=False),
        sa.PrimaryKeyConstraint("scope", "stream", name="pk_exactlyonce_sequence_streams"),
    )
    op.create_index("ix_exactlyonce_sequence_streams_gap_since", "exactlyonce_sequence_streams", ["gap_since"])
    op.create_table(
        "exactlyonce_parked",
        sa.Column("scope", ExactString(200), nullable=False),
        sa.Column("stream", ExactString(255), nullable=False),
        sa.Column("number", sa.BigInteger(), nullable=False),
        sa.Column("message_id", ExactString(255), nullable=False),
        sa.Column("topic", sa.String(249), nullable=False),
        sa.Column("kafka_partition", sa.Integer(), nullable=False),
        sa.Column("kafka_offset", sa.BigInteger(), nullable=False),
        sa.Column("key", _BLOB, nullable=True),
        sa.Column("value", _BLOB, nullable=True),
        sa.Column("headers", sa.Text().with_variant(mysql.LONGTEXT(), "mysql", "mariadb"), nullable=False),
        sa.Column("timestamp_ms", sa.BigInteger(), nullable=True),
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column("parked_at", sa.DateTime(timezone=False), nullable=False),
        sa.PrimaryKeyConstraint("scope", "stream", "number", name="pk_exactlyonce_parked"),
    )
    op.create_table(
        "exactlyonce_counters",
        sa.Column("scope", ExactString(200), nullable=False),
        sa.Column("topic", sa.String(249), nullable=False),
        sa.Column("kafka_partition", sa.Integer(), nullable=False),
        sa.Column("group_id", sa.String(200), nullable=False),
        sa.Column("applied", sa.BigInteger(), nullable=False),
        sa.Column("duplicates", sa.BigInteger(), nullable=False),
        sa.Column("skipped", sa.BigInteger(), nullable=False),
        sa.Column("dead_lettered", sa.BigInteger(), nullable=False),
        sa.Column("parked", sa.BigInteger(), nullable=False),
        sa.Column("last_offset", sa.BigInteger(), nullable=True),
        sa.Column("last_processed_at", sa.DateTime(timezone=False), nullable=True),
        sa.PrimaryKeyConstraint("scope", "topic", "kafka_partition", name="pk_exactlyonce_counters"),
    )


def downgrade() -> None:
    op.drop_table("exactlyonce_counters")
    op.drop_table("exactlyonce_parked")
    op.drop_index("ix_exactlyonce_sequence_streams_gap_since", table_name="exactlyonce_sequence_streams")
    op.drop_table("exactlyonce_sequence_streams")
