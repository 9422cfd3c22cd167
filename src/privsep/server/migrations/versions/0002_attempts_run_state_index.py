"""Index task attempts by (run_id, state), for the end-of-run check in ``runs.advance``."""

from __future__ import annotations

from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"


def upgrade() -> None:
    op.create_index("ix_task_attempts_run_id_state", "task_attempts", ["run_id", "state"])


def downgrade() -> None:
    op.drop_index("ix_task_attempts_run_id_state", table_name="task_attempts")
