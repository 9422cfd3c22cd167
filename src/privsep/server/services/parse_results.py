"""Parse results: what a parse sandbox found in its one definition file, stored once for
the route (:mod:`privsep.server.routes.parse_trigger`) and the fast path
(:mod:`privsep.server.fastpath`) alike."""

from __future__ import annotations

import json
from typing import Any, cast

from sqlalchemy import Boolean, CursorResult, bindparam, func, insert, or_, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from privsep.server.auth import ParsePrincipal
from privsep.server.db.models import (
    DEFAULT_QUEUE,
    ParseError,
    ParseJob,
    ParseJobState,
    Workflow,
    WorkflowVersion,
    utcnow,
    version_digest,
)
from privsep.server.errors import bad_request, conflict
from privsep.server.routes._sql import for_dialect, table_of
from privsep.server.schemas import ParseResultRequest, WorkflowDefinition
from privsep.server.services.discovery_reports import plain_uri
from privsep.server.state import ServerState


def _check_graph(wf: WorkflowDefinition) -> None:
    ids = [t.task_id for t in wf.tasks]
    if len(ids) != len(set(ids)):
        raise bad_request("invalid_definition", f"workflow {wf.workflow_id!r} repeats a task id")
    known = set(ids)
    for task in wf.tasks:
        missing = [u for u in task.upstream if u not in known]
        if missing:
            raise bad_request(
                "invalid_definition", f"task {task.task_id!r} names unknown upstream {missing}"
            )
    # Kahn's algorithm: every task must be reachable in a topological order, or there is a cycle.
    pending = {t.task_id: set(t.upstream) for t in wf.tasks}
    while pending:
        ready = [t for t, ups in pending.items() if not ups]
        if not ready:
            raise bad_request(
                "invalid_definition", f"workflow {wf.workflow_id!r} has a dependency cycle"
            )
        for t in ready:
            del pending[t]
        for ups in pending.values():
            ups.difference_update(ready)


def _unassigned(workflows: list[WorkflowDefinition], allowed: list[str]) -> str | None:
    """Why a result is refused when its file declares a workflow id that the folder's
    manifest does not assign to it (one file must not take over another's workflow), or
    None. The whole result is refused, so a file is never half stored."""
    others = sorted({wf.workflow_id for wf in workflows} - set(allowed))
    if not others:
        return None
    return (
        f"declares workflow {others[0]!r}"
        + (f" (and {len(others) - 1} more)" if len(others) > 1 else "")
        + ", which manifest.json does not assign to this file; nothing from it was stored. "
        "Map the workflow to this file in manifest.json (runner manifest check lists the gaps)."
    )


def _taken(
    session: Session,
    workflows: list[WorkflowDefinition],
    uri: str,
    owner: str | None,
    allowed: list[str] | None,
) -> str | None:
    """Why a result is refused when it declares a workflow that is not this file's to
    define, or None. A workflow belongs to the supervisor whose files first defined it
    (another supervisor's file never takes it over), and, without a manifest to say which
    file declares it, to the first file that did while that file is there: a later file
    declaring the same id is an import error naming both. With a manifest, the manifest
    decides (it may move a workflow from one file to another)."""
    if not workflows:
        return None
    rows = session.execute(_DECLARED, {"b_ids": [wf.workflow_id for wf in workflows]}).all()
    for row in sorted(rows, key=lambda row: str(row.id)):
        if row.supervisor_id is not None and row.supervisor_id != owner:
            return (
                f"declares workflow {row.id!r}, which {row.source_uri} of another supervisor "
                "defines; nothing from this file was stored. A workflow belongs to the "
                "supervisor whose files first defined it: rename the workflow here."
            )
        if allowed is None and row.active and row.source_uri not in (None, uri):
            return (
                f"declares workflow {row.id!r}, which {row.source_uri} already declares; "
                f"the first file keeps the id, and nothing from {uri} was stored. Rename the "
                "workflow in one of the two files, or delete one of them."
            )
    return None


def store_result(state: ServerState, me: ParsePrincipal, body: ParseResultRequest) -> None:
    """Store what the parse sandbox found in its one file: definitions, or an import error.
    Raises 409 ``not_running`` (and stores nothing) unless the job is running under the
    token's supervisor; that check is the first statement, which also ends the job."""
    for wf in body.workflows:
        _check_graph(wf)
    with state.db.write_session() as session:
        # Checks the job (still running, under this supervisor) and ends it in one statement.
        ended = session.execute(
            _END_PARSE_JOB,
            {
                "b_job_id": me.job_id,
                "b_supervisor_id": me.supervisor_id,
                "b_state": ParseJobState.SUCCESS if body.error is None else ParseJobState.FAILED,
                "b_now": utcnow(),
            },
        ).first()
        if ended is None:
            raise conflict("this parse job is no longer running", "not_running")
        uri, bundle_version, allowed = ended.uri, ended.bundle_version, ended.workflow_ids
        owner = ended.queued_by
        error = body.error
        if error is None:
            error = (None if allowed is None else _unassigned(body.workflows, allowed)) or _taken(
                session, body.workflows, plain_uri(uri), owner, allowed
            )
            if error is not None:  # rare: a second statement rather than a costlier first
                session.execute(_FAIL_PARSE_JOB, {"b_job_id": me.job_id})
        if error is not None:
            session.execute(
                _NEW_PARSE_ERROR,
                {"file_path": plain_uri(uri), "message": error, "bundle_version": bundle_version},
            )
            return
        for wf in body.workflows:
            store_definition(session, wf, uri, bundle_version, owner, may_move=allowed is not None)


# Built once, as Core statements on the tables (see privsep.server.routes._sql).
_JOBS = table_of(ParseJob)
_WORKFLOWS = table_of(Workflow)
_VERSIONS = table_of(WorkflowVersion)
_END_PARSE_JOB = (
    update(_JOBS)
    .where(
        _JOBS.c.id == bindparam("b_job_id"),
        _JOBS.c.state == ParseJobState.RUNNING,
        _JOBS.c.supervisor_id == bindparam("b_supervisor_id"),
    )
    .values(state=bindparam("b_state"), finished_at=bindparam("b_now"))
    .returning(_JOBS.c.uri, _JOBS.c.bundle_version, _JOBS.c.workflow_ids, _JOBS.c.queued_by)
)
_FAIL_PARSE_JOB = (
    update(_JOBS).where(_JOBS.c.id == bindparam("b_job_id")).values(state=ParseJobState.FAILED)
)
_NEW_PARSE_ERROR = insert(table_of(ParseError))
# The workflow row is made by the first definition of it and kept after: an upsert that does
# nothing when it exists, so two first parses of one workflow cannot both try to make it.
_NEW_WORKFLOW = {
    "sqlite": sqlite_insert(_WORKFLOWS).on_conflict_do_nothing(index_elements=[_WORKFLOWS.c.id]),
    "postgresql": pg_insert(_WORKFLOWS).on_conflict_do_nothing(index_elements=[_WORKFLOWS.c.id]),
}
_VERSION_KEY = (_VERSIONS.c.workflow_id, _VERSIONS.c.bundle_version, _VERSIONS.c.content_hash)
# A new version's id; no row when this exact version is stored already (then _VERSION_ID).
_NEW_VERSION = {
    "sqlite": sqlite_insert(_VERSIONS)
    .on_conflict_do_nothing(index_elements=_VERSION_KEY)
    .returning(_VERSIONS.c.id),
    "postgresql": pg_insert(_VERSIONS)
    .on_conflict_do_nothing(index_elements=_VERSION_KEY)
    .returning(_VERSIONS.c.id),
}
_VERSION_ID = select(_VERSIONS.c.id).where(
    *(column == bindparam(column.key) for column in _VERSION_KEY)
)
_DECLARED = select(
    _WORKFLOWS.c.id, _WORKFLOWS.c.supervisor_id, _WORKFLOWS.c.source_uri, _WORKFLOWS.c.active
).where(_WORKFLOWS.c.id.in_(bindparam("b_ids", expanding=True)))
# The same rules as _taken, in the statement that takes the workflow: two results racing for
# one new id both pass _taken, and the one that finds the row already someone else's changes
# nothing (then the whole result is rolled back).
_MAKE_CURRENT = (
    update(_WORKFLOWS)
    .where(
        _WORKFLOWS.c.id == bindparam("b_workflow_id"),
        or_(
            _WORKFLOWS.c.supervisor_id.is_(None),
            _WORKFLOWS.c.supervisor_id == bindparam("b_owner"),
        ),
        or_(
            bindparam("b_may_move", type_=Boolean),
            _WORKFLOWS.c.source_uri.is_(None),
            _WORKFLOWS.c.source_uri == bindparam("b_uri"),
            _WORKFLOWS.c.active.is_(False),
        ),
    )
    .values(
        current_version_id=bindparam("b_version_id"),
        source_uri=bindparam("b_uri"),
        active=True,
        supervisor_id=func.coalesce(_WORKFLOWS.c.supervisor_id, bindparam("b_owner")),
    )
)


def store_definition(
    session: Session,
    wf: WorkflowDefinition,
    uri: str,
    bundle: str,
    owner: str | None = None,
    *,
    may_move: bool = True,
) -> None:
    """Make ``wf`` its workflow's current version (a new version only if this exact
    definition from this exact file is not stored yet). Three statements when the version is
    new (the usual case: discovery parses a file when it changed), four when it is not.

    ``owner`` is the supervisor whose file this is; ``may_move``: the file may take the
    workflow from another active file of the same owner (a manifest assigned it here). Raises
    409 ``not_owner`` when the workflow is not this file's to take (see :func:`_taken`)."""
    data = wf.model_dump()
    for task in data["tasks"]:
        # A task on the default queue is stored as before queues existed: the same text, so
        # the same version digest, and no new version of every workflow after an upgrade.
        if task["queue"] == DEFAULT_QUEUE:
            del task["queue"]
    text = json.dumps(data, sort_keys=True, separators=(",", ":"))
    digest = version_digest(text, uri)
    session.execute(
        for_dialect(session, _NEW_WORKFLOW), {"id": wf.workflow_id, "supervisor_id": owner}
    )
    key = {"workflow_id": wf.workflow_id, "bundle_version": bundle, "content_hash": digest}
    version_id = session.scalar(
        for_dialect(session, _NEW_VERSION), {**key, "definition": text, "source_uri": uri}
    )
    if version_id is None:
        version_id = session.scalar(_VERSION_ID, key)
    taken = session.execute(
        _MAKE_CURRENT,
        {
            "b_workflow_id": wf.workflow_id,
            "b_version_id": version_id,
            "b_uri": plain_uri(uri),
            "b_owner": owner,
            "b_may_move": may_move,
        },
    )
    if not cast(CursorResult[Any], taken).rowcount:
        raise conflict(
            f"workflow {wf.workflow_id!r} was defined by another file meanwhile", "not_owner"
        )
