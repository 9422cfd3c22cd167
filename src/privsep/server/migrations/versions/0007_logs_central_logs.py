"""Central logs: every work item's output, shipped by the supervisors that ran it.

* ``attempt_logs``: one row per item (task attempt, parse job, trigger batch) with its size,
  its newest chunk's ``seq`` and whether the per-item cap cut it;
* ``attempt_log_streams``: each node-local log file that feeds it, its supervisor and how
  many of its bytes the server holds, so a chunk sent twice is stored once;
* ``attempt_log_chunks``: the text, in the order it was stored;
* ``ix_audit_log_subject``: the check that a supervisor held an item it ships output for
  reads the ``token_issued`` rows of that item.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"

# Frozen copies of the model constants: a migration must not change when the models do.
ID = 36
NAME = 250


def _ts() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "attempt_logs",
        sa.Column("item_id", sa.String(NAME), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("last_seq", sa.Integer(), nullable=False),
        sa.Column("truncated", sa.Boolean(), nullable=False),
        sa.Column("final_execution", sa.Integer(), nullable=False),
        sa.Column("created_at", _ts(), nullable=False),
        sa.Column("updated_at", _ts(), nullable=False),
        sa.PrimaryKeyConstraint("item_id", name=op.f("pk_attempt_logs")),
    )
    op.create_index(op.f("ix_attempt_logs_updated_at"), "attempt_logs", ["updated_at"])
    op.create_table(
        "attempt_log_streams",
        sa.Column("item_id", sa.String(NAME), nullable=False),
        sa.Column("stream", sa.String(64), nullable=False),
        sa.Column("supervisor_id", sa.String(ID), nullable=False),
        sa.Column("end_offset", sa.BigInteger(), nullable=False),
        sa.Column("final", sa.Boolean(), nullable=False),
        sa.ForeignKeyConstraint(
            ["item_id"],
            ["attempt_logs.item_id"],
            name=op.f("fk_attempt_log_streams_item_id_attempt_logs"),
        ),
        sa.ForeignKeyConstraint(
            ["supervisor_id"],
            ["supervisors.id"],
            name=op.f("fk_attempt_log_streams_supervisor_id_supervisors"),
        ),
        sa.PrimaryKeyConstraint("item_id", "stream", name=op.f("pk_attempt_log_streams")),
    )
    op.create_table(
        "attempt_log_chunks",
        sa.Column("item_id", sa.String(NAME), nullable=False),
        sa.Column("seq", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(
            ["item_id"],
            ["attempt_logs.item_id"],
            name=op.f("fk_attempt_log_chunks_item_id_attempt_logs"),
        ),
        sa.PrimaryKeyConstraint("item_id", "seq", name=op.f("pk_attempt_log_chunks")),
    )
    op.create_index(op.f("ix_audit_log_subject"), "audit_log", ["subject"])


def downgrade() -> None:
    op.drop_index(op.f("ix_audit_log_subject"), table_name="audit_log")
    op.drop_table("attempt_log_chunks")
    op.drop_table("attempt_log_streams")
    op.drop_index(op.f("ix_attempt_logs_updated_at"), table_name="attempt_logs")
    op.drop_table("attempt_logs")
