"""Outbox rows the broker refused for good: when, and why.

A refused row stays pending (``sent_at`` NULL) with ``refused_at`` and
``refusal`` set: the relay does not send it again, and the later rows of its
topic and key wait behind it, until an operator releases or discards it.
Before this revision the relay kept refused rows in memory only, so every
relay start sent them (and their successors) again.

Downgrading drops both columns: refused rows become plain pending rows, and
a relay of the older revision tries them again.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("exactlyonce_outbox") as batch:
        batch.add_column(sa.Column("refused_at", sa.DateTime(timezone=False), nullable=True))
        batch.add_column(sa.Column("refusal", sa.Text(), nullable=True))
    op.create_index("ix_exactlyonce_outbox_refused_at", "exactlyonce_outbox", ["refused_at"])


def downgrade() -> None:
    op.drop_index("ix_exactlyonce_outbox_refused_at", table_name="exactlyonce_outbox")
    with op.batch_alter_table("exactlyonce_outbox") as batch:
        batch.drop_column("refusal")
        batch.drop_column("refused_at")
