"""The workflow ids a parse job's file may declare (from the workflows folder's manifest)."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"


def upgrade() -> None:
    with op.batch_alter_table("parse_jobs") as batch:
        batch.add_column(sa.Column("workflow_ids", sa.JSON(none_as_null=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("parse_jobs") as batch:
        batch.drop_column("workflow_ids")
