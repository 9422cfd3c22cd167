"""Owners of discovery's reports: which supervisor reported each definition file first
(``source_files``), which supervisor's files define each workflow (``workflows.supervisor_id``)
and which supervisor queued each parse job (``parse_jobs.queued_by``)."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"

ID = 36
URI = 1024


def upgrade() -> None:
    op.create_table(
        "source_files",
        sa.Column("uri", sa.String(URI), nullable=False),
        sa.Column("supervisor_id", sa.String(ID), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["supervisor_id"],
            ["supervisors.id"],
            name=op.f("fk_source_files_supervisor_id_supervisors"),
        ),
        sa.PrimaryKeyConstraint("uri", name=op.f("pk_source_files")),
    )
    with op.batch_alter_table("workflows") as batch:
        batch.add_column(sa.Column("supervisor_id", sa.String(ID), nullable=True))
        batch.create_foreign_key(
            op.f("fk_workflows_supervisor_id_supervisors"), "supervisors", ["supervisor_id"], ["id"]
        )
    with op.batch_alter_table("parse_jobs") as batch:
        batch.add_column(sa.Column("queued_by", sa.String(ID), nullable=True))
        batch.create_foreign_key(
            op.f("fk_parse_jobs_queued_by_supervisors"), "supervisors", ["queued_by"], ["id"]
        )


def downgrade() -> None:
    with op.batch_alter_table("parse_jobs") as batch:
        batch.drop_constraint(op.f("fk_parse_jobs_queued_by_supervisors"), type_="foreignkey")
        batch.drop_column("queued_by")
    with op.batch_alter_table("workflows") as batch:
        batch.drop_constraint(op.f("fk_workflows_supervisor_id_supervisors"), type_="foreignkey")
        batch.drop_column("supervisor_id")
    op.drop_table("source_files")
