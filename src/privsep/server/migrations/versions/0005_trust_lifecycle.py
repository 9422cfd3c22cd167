"""Trust lifecycle: supervisor key generations, registered operators, attempt executions.

* ``supervisors.key_generation`` and ``revoked_at``: a session is bound to the generation it
  was opened under; revoking or re-keying moves it on.
* ``operators``: operator credentials, registered, listed and revoked like supervisors.
* ``task_attempts.execution``: how many times the attempt was claimed; a work token names the
  execution it was issued for.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"

# Frozen copies of the model constants: a migration must not change when the models do.
ID = 36
NAME = 250


def _ts() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table("supervisors") as batch:
        batch.add_column(
            sa.Column("key_generation", sa.Integer(), nullable=False, server_default="1")
        )
        batch.add_column(sa.Column("revoked_at", _ts(), nullable=True))
    with op.batch_alter_table("task_attempts") as batch:
        batch.add_column(sa.Column("execution", sa.Integer(), nullable=False, server_default="0"))
    op.create_table(
        "operators",
        sa.Column("id", sa.String(ID), nullable=False),
        sa.Column("name", sa.String(NAME), nullable=False),
        sa.Column("public_key_pem", sa.Text(), nullable=False),
        sa.Column("key_id", sa.String(NAME), nullable=False),
        sa.Column("registered_at", _ts(), nullable=False),
        sa.Column("last_session_at", _ts(), nullable=True),
        sa.Column("active", sa.Boolean(), nullable=False),
        sa.Column("key_generation", sa.Integer(), nullable=False, server_default="1"),
        sa.Column("revoked_at", _ts(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_operators")),
        sa.UniqueConstraint("name", name=op.f("uq_operators_name")),
        sa.UniqueConstraint("key_id", name=op.f("uq_operators_key_id")),
    )


def downgrade() -> None:
    op.drop_table("operators")
    with op.batch_alter_table("task_attempts") as batch:
        batch.drop_column("execution")
    with op.batch_alter_table("supervisors") as batch:
        batch.drop_column("revoked_at")
        batch.drop_column("key_generation")
