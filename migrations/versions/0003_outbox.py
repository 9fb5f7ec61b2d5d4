"""The transactional outbox: messages published in a transaction, sent by the relay.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

from exactlyonce.storage.schema import ExactString

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "exactlyonce_outbox",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("topic", sa.String(249), nullable=False),
        sa.Column("key", sa.LargeBinary().with_variant(mysql.LONGBLOB(), "mysql", "mariadb"), nullable=True),
        sa.Column("value", sa.LargeBinary().with_variant(mysql.LONGBLOB(), "mysql", "mariadb"), nullable=False),
        sa.Column("headers", sa.Text().with_variant(mysql.LONGTEXT(), "mysql", "mariadb"), nullable=False),
        sa.Column("message_id", ExactString(255), nullable=False),
        sa.Column("ordering_key", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=False), nullable=False),
        sa.Column("sent_at", sa.DateTime(timezone=False), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_exactlyonce_outbox"),
    )
    op.create_index("ix_exactlyonce_outbox_sent_at_id", "exactlyonce_outbox", ["sent_at", "id"])
    op.create_index("ix_exactlyonce_outbox_ordering_key_sent_at_id", "exactlyonce_outbox",
                    ["ordering_key", "sent_at", "id"])


def downgrade() -> None:
    op.drop_index("ix_exactlyonce_outbox_ordering_key_sent_at_id", table_name="exactlyonce_outbox")
    op.drop_index("ix_exactlyonce_outbox_sent_at_id", table_name="exactlyonce_outbox")
    op.drop_table("exactlyonce_outbox")
