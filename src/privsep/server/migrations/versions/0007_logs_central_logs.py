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

from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"

# Frozen copies of the model constants (ids and names; the stream id the supervisor makes):
# a migration must not change when the models do.
SUPERVISOR_ID, ITEM_ID, STREAM_ID = sa.String(36), sa.String(250), sa.String(64)


def _required(name: str, kind: Any) -> sa.Column[Any]:
    """Every column of these tables is NOT NULL."""
    return sa.Column(name, kind, nullable=False)


def _belongs_to_log(table: str) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint(
        ["item_id"], ["attempt_logs.item_id"], name=op.f(f"fk_{table}_item_id_attempt_logs")
    )


def upgrade() -> None:
    op.create_table(
        "attempt_logs",
        _required("item_id", ITEM_ID),
        _required("kind", sa.String(16)),
        _required("size_bytes", sa.BigInteger()),
        _required("last_seq", sa.Integer()),
        _required("truncated", sa.Boolean()),
        _required("final_execution", sa.Integer()),
        _required("created_at", sa.DateTime(timezone=True)),
        _required("updated_at", sa.DateTime(timezone=True)),
        sa.PrimaryKeyConstraint("item_id", name=op.f("pk_attempt_logs")),
    )
    op.create_index(op.f("ix_attempt_logs_updated_at"), "attempt_logs", ["updated_at"])
    op.create_table(
        "attempt_log_streams",
        _required("item_id", ITEM_ID),
        _required("stream", STREAM_ID),
        _required("supervisor_id", SUPERVISOR_ID),
        _required("end_offset", sa.BigInteger()),
        _required("final", sa.Boolean()),
        _belongs_to_log("attempt_log_streams"),
        sa.ForeignKeyConstraint(
            ["supervisor_id"],
            ["supervisors.id"],
            name=op.f("fk_attempt_log_streams_supervisor_id_supervisors"),
        ),
        sa.PrimaryKeyConstraint("item_id", "stream", name=op.f("pk_attempt_log_streams")),
    )
    op.create_table(
        "attempt_log_chunks",
        _required("item_id", ITEM_ID),
        sa.Column("seq", sa.Integer(), autoincrement=False, nullable=False),
        _required("text", sa.Text()),
        _belongs_to_log("attempt_log_chunks"),
        sa.PrimaryKeyConstraint("item_id", "seq", name=op.f("pk_attempt_log_chunks")),
    )
    op.create_index(op.f("ix_audit_log_subject"), "audit_log", ["subject"])


def downgrade() -> None:
    op.drop_index(op.f("ix_audit_log_subject"), table_name="audit_log")
    op.drop_table("attempt_log_chunks")
    op.drop_table("attempt_log_streams")
    op.drop_index(op.f("ix_attempt_logs_updated_at"), table_name="attempt_logs")
    op.drop_table("attempt_logs")
