"""What each supervisor's discovery last reported, for the status page: ``up_to_date``,
``failing`` (its last scan failed, with the error) or ``off``. Existing supervisors have said
nothing yet, so the columns start empty."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"


def upgrade() -> None:
    with op.batch_alter_table("supervisors") as batch:
        batch.add_column(sa.Column("discovery_state", sa.String(32), nullable=True))
        batch.add_column(sa.Column("discovery_error", sa.Text(), nullable=True))
        batch.add_column(sa.Column("discovery_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("supervisors") as batch:
        batch.drop_column("discovery_at")
        batch.drop_column("discovery_error")
        batch.drop_column("discovery_state")
