"""Index task attempts by (run_id, state), for the end-of-run check in ``runs.advance``.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22 00:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_task_attempts_run_id_state", "task_attempts", ["run_id", "state"])


def downgrade() -> None:
    op.drop_index("ix_task_attempts_run_id_state", table_name="task_attempts")
