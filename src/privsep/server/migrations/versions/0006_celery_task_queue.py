"""Give every task attempt a work queue, so a claim can hand it only to a supervisor that
serves that queue. Existing attempts are on ``default``, the queue every supervisor serves
unless configured otherwise."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"


def upgrade() -> None:
    with op.batch_alter_table("task_attempts") as batch:
        batch.add_column(
            sa.Column("queue", sa.String(64), nullable=False, server_default="default")
        )


def downgrade() -> None:
    with op.batch_alter_table("task_attempts") as batch:
        batch.drop_column("queue")
