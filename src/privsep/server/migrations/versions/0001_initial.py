"""Initial schema: workflows, runs, task attempts, triggers, parsing, secrets, identity, audit.

Written out by hand rather than from ``metadata.create_all`` so that this revision stays what it
is when the models change later; ``tests/server/test_db.py`` checks that head matches the models.

Two foreign keys form cycles (``workflows.current_version_id`` and ``task_attempts.trigger_id``).
They are declared ``use_alter``: SQLite (no ALTER ... ADD CONSTRAINT) gets them inline, since it
accepts forward references; PostgreSQL gets them by ALTER TABLE once both tables exist.

The audit log is made append-only with triggers that raise on UPDATE and DELETE (and TRUNCATE on
PostgreSQL), with SQLSTATE 23000 on PostgreSQL so both backends raise an integrity error.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None

# Frozen copies of the model constants: a migration must not change when the models do.
ID = 36
NAME = 250
URI = 1024
HASH = 128
STATE = 32

RUN_STATES = ("queued", "running", "success", "failed")
RUN_TRIGGER_KINDS = ("manual", "schedule")
ATTEMPT_STATES = (
    "queued",
    "running",
    "deferred",
    "up_for_retry",
    "success",
    "failed",
    "skipped",
    "upstream_failed",
)
PARSE_JOB_STATES = ("queued", "running", "success", "failed")
TRIGGER_STATES = ("queued", "running", "fired", "failed", "cancelled")
GRANT_KINDS = ("variable", "connection")

APPEND_ONLY_MESSAGE = "audit_log is append-only"


def _ts() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def _state(name: str, values: Sequence[str]) -> sa.Enum:
    return sa.Enum(*values, name=name, native_enum=False, create_constraint=True, length=STATE)


def upgrade() -> None:
    """Create every table, the cyclic foreign keys and the audit-log triggers."""
    dialect = op.get_bind().dialect.name

    op.create_table(
        "workflows",
        sa.Column("id", sa.String(NAME), nullable=False),
        sa.Column("active", sa.Boolean(), nullable=False),
        sa.Column("source_uri", sa.String(URI), nullable=True),
        sa.Column("current_version_id", sa.Integer(), nullable=True),
        sa.Column("created_at", _ts(), nullable=False),
        sa.ForeignKeyConstraint(
            ["current_version_id"],
            ["workflow_versions.id"],
            name="fk_workflows_current_version_id_workflow_versions",
            use_alter=True,
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_workflows")),
    )
    op.create_index(op.f("ix_workflows_source_uri"), "workflows", ["source_uri"])
    op.create_table(
        "workflow_versions",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("workflow_id", sa.String(NAME), nullable=False),
        sa.Column("definition", sa.Text(), nullable=False),
        sa.Column("bundle_version", sa.String(NAME), nullable=False),
        sa.Column("content_hash", sa.String(HASH), nullable=False),
        sa.Column("source_uri", sa.String(URI), nullable=True),
        sa.Column("created_at", _ts(), nullable=False),
        sa.ForeignKeyConstraint(
            ["workflow_id"],
            ["workflows.id"],
            name=op.f("fk_workflow_versions_workflow_id_workflows"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_workflow_versions")),
        sa.UniqueConstraint(
            "workflow_id",
            "bundle_version",
            "content_hash",
            name=op.f("uq_workflow_versions_workflow_id_bundle_version_content_hash"),
        ),
    )
    op.create_index(op.f("ix_workflow_versions_workflow_id"), "workflow_versions", ["workflow_id"])

    op.create_table(
        "supervisors",
        sa.Column("id", sa.String(ID), nullable=False),
        sa.Column("name", sa.String(NAME), nullable=False),
        sa.Column("public_key_pem", sa.Text(), nullable=False),
        sa.Column("registered_at", _ts(), nullable=False),
        sa.Column("last_heartbeat_at", _ts(), nullable=True),
        sa.Column("active", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_supervisors")),
        sa.UniqueConstraint("name", name=op.f("uq_supervisors_name")),
    )

    op.create_table(
        "runs",
        sa.Column("id", sa.String(ID), nullable=False),
        sa.Column("workflow_id", sa.String(NAME), nullable=False),
        sa.Column("workflow_version_id", sa.Integer(), nullable=False),
        sa.Column("state", _state("run_state", RUN_STATES), nullable=False),
        sa.Column("trigger_kind", _state("run_trigger_kind", RUN_TRIGGER_KINDS), nullable=False),
        sa.Column("conf", sa.JSON(), nullable=False),
        sa.Column("logical_date", _ts(), nullable=True),
        sa.Column("created_at", _ts(), nullable=False),
        sa.Column("started_at", _ts(), nullable=True),
        sa.Column("ended_at", _ts(), nullable=True),
        sa.ForeignKeyConstraint(
            ["workflow_id"], ["workflows.id"], name=op.f("fk_runs_workflow_id_workflows")
        ),
        sa.ForeignKeyConstraint(
            ["workflow_version_id"],
            ["workflow_versions.id"],
            name=op.f("fk_runs_workflow_version_id_workflow_versions"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_runs")),
        sa.UniqueConstraint(
            "workflow_id", "logical_date", name=op.f("uq_runs_workflow_id_logical_date")
        ),
    )
    op.create_index("ix_runs_state_created_at", "runs", ["state", "created_at"])
    op.create_index("ix_runs_workflow_id_created_at", "runs", ["workflow_id", "created_at"])

    op.create_table(
        "task_attempts",
        sa.Column("id", sa.String(ID), nullable=False),
        sa.Column("run_id", sa.String(ID), nullable=False),
        sa.Column("task_id", sa.String(NAME), nullable=False),
        sa.Column("try_number", sa.Integer(), nullable=False),
        sa.Column("state", _state("attempt_state", ATTEMPT_STATES), nullable=False),
        sa.Column("supervisor_id", sa.String(ID), nullable=True),
        sa.Column("heartbeat_at", _ts(), nullable=True),
        sa.Column("created_at", _ts(), nullable=False),
        sa.Column("started_at", _ts(), nullable=True),
        sa.Column("ended_at", _ts(), nullable=True),
        sa.Column("next_try_at", _ts(), nullable=True),
        sa.Column("exit_code", sa.Integer(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("trigger_id", sa.String(ID), nullable=True),
        sa.Column("trigger_event", sa.JSON(none_as_null=True), nullable=True),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"], name=op.f("fk_task_attempts_run_id_runs")),
        sa.ForeignKeyConstraint(
            ["supervisor_id"],
            ["supervisors.id"],
            name=op.f("fk_task_attempts_supervisor_id_supervisors"),
        ),
        sa.ForeignKeyConstraint(
            ["trigger_id"],
            ["triggers.id"],
            name="fk_task_attempts_trigger_id_triggers",
            use_alter=True,
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_task_attempts")),
        sa.UniqueConstraint(
            "run_id",
            "task_id",
            "try_number",
            name=op.f("uq_task_attempts_run_id_task_id_try_number"),
        ),
    )
    op.create_index("ix_task_attempts_state_next_try_at", "task_attempts", ["state", "next_try_at"])
    op.create_index(
        "ix_task_attempts_state_heartbeat_at", "task_attempts", ["state", "heartbeat_at"]
    )
    op.create_index(
        "ix_task_attempts_supervisor_id_state", "task_attempts", ["supervisor_id", "state"]
    )

    op.create_table(
        "triggers",
        sa.Column("id", sa.String(ID), nullable=False),
        sa.Column("attempt_id", sa.String(ID), nullable=False),
        sa.Column("serialized", sa.JSON(), nullable=False),
        sa.Column("state", _state("trigger_state", TRIGGER_STATES), nullable=False),
        sa.Column("supervisor_id", sa.String(ID), nullable=True),
        sa.Column("event", sa.JSON(none_as_null=True), nullable=True),
        sa.Column("created_at", _ts(), nullable=False),
        sa.Column("claimed_at", _ts(), nullable=True),
        sa.Column("finished_at", _ts(), nullable=True),
        sa.ForeignKeyConstraint(
            ["attempt_id"], ["task_attempts.id"], name=op.f("fk_triggers_attempt_id_task_attempts")
        ),
        sa.ForeignKeyConstraint(
            ["supervisor_id"],
            ["supervisors.id"],
            name=op.f("fk_triggers_supervisor_id_supervisors"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_triggers")),
    )
    op.create_index(op.f("ix_triggers_attempt_id"), "triggers", ["attempt_id"])
    op.create_index("ix_triggers_state_supervisor_id", "triggers", ["state", "supervisor_id"])

    if op.get_bind().dialect.supports_alter:
        op.create_foreign_key(
            "fk_workflows_current_version_id_workflow_versions",
            "workflows",
            "workflow_versions",
            ["current_version_id"],
            ["id"],
        )
        op.create_foreign_key(
            "fk_task_attempts_trigger_id_triggers",
            "task_attempts",
            "triggers",
            ["trigger_id"],
            ["id"],
        )

    op.create_table(
        "parse_jobs",
        sa.Column("id", sa.String(ID), nullable=False),
        sa.Column("uri", sa.String(URI), nullable=False),
        sa.Column("content_hash", sa.String(HASH), nullable=True),
        sa.Column("bundle_version", sa.String(NAME), nullable=False),
        sa.Column("state", _state("parse_job_state", PARSE_JOB_STATES), nullable=False),
        sa.Column("supervisor_id", sa.String(ID), nullable=True),
        sa.Column("created_at", _ts(), nullable=False),
        sa.Column("claimed_at", _ts(), nullable=True),
        sa.Column("finished_at", _ts(), nullable=True),
        sa.ForeignKeyConstraint(
            ["supervisor_id"],
            ["supervisors.id"],
            name=op.f("fk_parse_jobs_supervisor_id_supervisors"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_parse_jobs")),
    )
    op.create_index("ix_parse_jobs_state_created_at", "parse_jobs", ["state", "created_at"])

    op.create_table(
        "parse_errors",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("file_path", sa.String(URI), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("bundle_version", sa.String(NAME), nullable=False),
        sa.Column("created_at", _ts(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_parse_errors")),
    )
    op.create_index(op.f("ix_parse_errors_file_path"), "parse_errors", ["file_path"])

    op.create_table(
        "variables",
        sa.Column("key", sa.String(NAME), nullable=False),
        sa.Column("value", sa.Text(), nullable=False),
        sa.Column("description", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("key", name=op.f("pk_variables")),
    )

    op.create_table(
        "connections",
        sa.Column("conn_id", sa.String(NAME), nullable=False),
        sa.Column("conn_type", sa.String(NAME), nullable=False),
        sa.Column("host", sa.String(URI), nullable=True),
        sa.Column("port", sa.Integer(), nullable=True),
        sa.Column("login", sa.String(NAME), nullable=True),
        sa.Column("password_encrypted", sa.Text(), nullable=True),
        sa.Column("schema", sa.String(NAME), nullable=True),
        sa.Column("extra_encrypted", sa.Text(), nullable=True),
        sa.Column("description", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("conn_id", name=op.f("pk_connections")),
    )

    op.create_table(
        "xcoms",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("run_id", sa.String(ID), nullable=False),
        sa.Column("task_id", sa.String(NAME), nullable=False),
        sa.Column("key", sa.String(NAME), nullable=False),
        sa.Column("value", sa.JSON(), nullable=False),  # None is stored as JSON null
        sa.Column("created_at", _ts(), nullable=False),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"], name=op.f("fk_xcoms_run_id_runs")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_xcoms")),
        sa.UniqueConstraint("run_id", "task_id", "key", name=op.f("uq_xcoms_run_id_task_id_key")),
    )

    op.create_table(
        "used_jtis",
        sa.Column("jti", sa.String(NAME), nullable=False),
        sa.Column("expires_at", _ts(), nullable=False),
        sa.PrimaryKeyConstraint("jti", name=op.f("pk_used_jtis")),
    )
    op.create_index(op.f("ix_used_jtis_expires_at"), "used_jtis", ["expires_at"])

    op.create_table(
        "signing_keys",
        sa.Column("kid", sa.String(NAME), nullable=False),
        sa.Column("public_key_pem", sa.Text(), nullable=False),
        sa.Column("created_at", _ts(), nullable=False),
        sa.Column("retired_at", _ts(), nullable=True),
        sa.PrimaryKeyConstraint("kid", name=op.f("pk_signing_keys")),
    )

    op.create_table(
        "policy_grants",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("workflow_pattern", sa.String(NAME), nullable=False),
        sa.Column("kind", _state("grant_kind", GRANT_KINDS), nullable=False),
        sa.Column("name_pattern", sa.String(NAME), nullable=False),
        sa.Column("created_at", _ts(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_policy_grants")),
        sa.UniqueConstraint(
            "workflow_pattern",
            "kind",
            "name_pattern",
            name=op.f("uq_policy_grants_workflow_pattern_kind_name_pattern"),
        ),
    )

    op.create_table(
        "audit_log",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("at", _ts(), nullable=False),
        sa.Column("event", sa.String(64), nullable=False),
        sa.Column("actor", sa.String(NAME), nullable=True),
        sa.Column("subject", sa.String(NAME), nullable=True),
        sa.Column("detail", sa.JSON(none_as_null=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_log")),
    )
    op.create_index(op.f("ix_audit_log_at"), "audit_log", ["at"])
    op.create_index("ix_audit_log_event_at", "audit_log", ["event", "at"])

    if dialect == "postgresql":
        op.execute(
            f"""
            CREATE FUNCTION privsep_audit_log_append_only() RETURNS trigger
            LANGUAGE plpgsql AS $$
            BEGIN
                RAISE EXCEPTION '{APPEND_ONLY_MESSAGE}' USING ERRCODE = '23000';
            END
            $$
            """
        )
        op.execute(
            "CREATE TRIGGER audit_log_append_only BEFORE UPDATE OR DELETE ON audit_log "
            "FOR EACH ROW EXECUTE FUNCTION privsep_audit_log_append_only()"
        )
        op.execute(
            "CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log "
            "FOR EACH STATEMENT EXECUTE FUNCTION privsep_audit_log_append_only()"
        )
    elif dialect == "sqlite":
        for action in ("UPDATE", "DELETE"):
            op.execute(
                f"CREATE TRIGGER audit_log_no_{action.lower()} BEFORE {action} ON audit_log "
                f"BEGIN SELECT RAISE(ABORT, '{APPEND_ONLY_MESSAGE}'); END"
            )
    else:  # pragma: no cover - engine.parse_url admits only these two
        raise NotImplementedError(f"no append-only audit log for dialect {dialect!r}")


def downgrade() -> None:
    """Drop everything :func:`upgrade` created, in reverse order."""
    dialect = op.get_bind().dialect.name
    if dialect == "postgresql":
        op.execute("DROP TRIGGER audit_log_no_truncate ON audit_log")
        op.execute("DROP TRIGGER audit_log_append_only ON audit_log")
        op.execute("DROP FUNCTION privsep_audit_log_append_only()")
        op.drop_constraint(
            "fk_task_attempts_trigger_id_triggers", "task_attempts", type_="foreignkey"
        )
        op.drop_constraint(
            "fk_workflows_current_version_id_workflow_versions", "workflows", type_="foreignkey"
        )
    else:
        op.execute("DROP TRIGGER audit_log_no_delete")
        op.execute("DROP TRIGGER audit_log_no_update")
    for table in (
        "audit_log",
        "policy_grants",
        "signing_keys",
        "used_jtis",
        "xcoms",
        "connections",
        "variables",
        "parse_errors",
        "parse_jobs",
        "triggers",
        "task_attempts",
        "runs",
        "supervisors",
        "workflow_versions",
        "workflows",
    ):
        op.drop_table(table)
