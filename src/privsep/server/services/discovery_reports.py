"""Discovery's reports: a supervisor queues parses of the definition files it found and says
which of them disappeared. Each supervisor speaks only for its own files.

The server cannot look into a supervisor's workflows folder, so what a supervisor discovered
is what it reported first: the first supervisor to queue a parse of a file owns it
(:class:`~privsep.server.db.models.SourceFile`), and the workflows its files define are its
own (``Workflow.supervisor_id``, set when a result is stored). Another supervisor is then
refused (403, with an audit record) when it

- queues a parse of that file, or reports it deleted;
- queues a parse of its own file with a workflow id (from its manifest) that another
  supervisor's files define.

A batch is refused whole, as it is queued whole. A parse result that declares another
supervisor's workflow is refused by :mod:`privsep.server.services.parse_results`, since a
supervisor without a manifest names no ids when it queues.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Row, insert, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import InstrumentedAttribute, Session

from privsep.server.auth import SupervisorPrincipal, audit
from privsep.server.db.models import ParseJob, SourceFile, Supervisor, Workflow, new_id
from privsep.server.errors import forbidden
from privsep.server.routes._sql import for_dialect, table_of
from privsep.server.schemas import ParseJobRequest
from privsep.server.state import ServerState
from privsep.server.wakeups import note_ready

_IN_CHUNK = 500
"""Values per ``IN (...)`` list: a batch may name thousands of files."""


def plain_uri(uri: str) -> str:
    """A definition file's URI without the ``#sha256=...`` pin that discovery adds: the
    file's identity, whatever its contents."""
    return uri.split("#", 1)[0]


@dataclass(frozen=True)
class _Refusal:
    """Why a report is refused, and what the audit record says of it."""

    message: str
    detail: dict[str, str]


class _Refused(Exception):
    """Raised inside a write transaction to roll it back; answered as a 403 after it."""

    def __init__(self, refusal: _Refusal) -> None:
        super().__init__(refusal.message)
        self.refusal = refusal


def _chunks(values: Iterable[str]) -> Iterator[list[str]]:
    ordered = sorted(set(values))
    for start in range(0, len(ordered), _IN_CHUNK):
        yield ordered[start : start + _IN_CHUNK]


def _foreign_file(
    session: Session, me: SupervisorPrincipal, uris: Iterable[str]
) -> _Refusal | None:
    """The first of ``uris`` that another supervisor reported first, as a refusal."""
    for chunk in _chunks(uris):
        row = session.execute(
            select(SourceFile.uri, Supervisor.name)
            .join(Supervisor, Supervisor.id == SourceFile.supervisor_id)
            .where(SourceFile.uri.in_(chunk), SourceFile.supervisor_id != me.supervisor_id)
            .order_by(SourceFile.uri)
            .limit(1)
        ).first()
        if row is not None:
            return _Refusal(
                f"{row.uri} was reported first by supervisor {row.name!r}: only that supervisor "
                "may queue its parse or report it deleted (let one supervisor discover each "
                "workflows folder; set supervisor.discovery = false on the others)",
                {"uri": row.uri, "owner": row.name},
            )
    return None


def _others_workflow(
    session: Session,
    me: SupervisorPrincipal,
    column: InstrumentedAttribute[Any],
    values: Iterable[str],
) -> Row[str, str | None, str] | None:
    """The first workflow (id, source_uri, owner's name) of another supervisor's whose
    ``column`` is one of ``values``."""
    for chunk in _chunks(values):
        row = session.execute(
            select(Workflow.id, Workflow.source_uri, Supervisor.name)
            .join(Supervisor, Supervisor.id == Workflow.supervisor_id)
            .where(column.in_(chunk), Workflow.supervisor_id != me.supervisor_id)
            .order_by(Workflow.id)
            .limit(1)
        ).first()
        if row is not None:
            return row
    return None


def _foreign_workflow(
    session: Session, me: SupervisorPrincipal, wanted: dict[str, str]
) -> _Refusal | None:
    """The first workflow id of ``wanted`` (id -> the file asking for it) that another
    supervisor's files define, as a refusal."""
    row = _others_workflow(session, me, Workflow.id, wanted)
    if row is None:
        return None
    return _Refusal(
        f"workflow {row.id!r} is defined by {row.source_uri} of supervisor {row.name!r}: "
        f"this supervisor's manifest cannot assign it to {wanted[row.id]}",
        {"workflow_id": row.id, "uri": wanted[row.id], "owner": row.name},
    )


def _foreign_source(
    session: Session, me: SupervisorPrincipal, uris: Sequence[str]
) -> _Refusal | None:
    """The first workflow that one of ``uris`` defines for another supervisor (a file no
    supervisor has reported since owners were recorded still has its workflows' owner)."""
    row = _others_workflow(session, me, Workflow.source_uri, uris)
    if row is None:
        return None
    return _Refusal(
        f"{row.source_uri} defines workflow {row.id!r} of supervisor {row.name!r}: "
        "only that supervisor may report it deleted",
        {"uri": str(row.source_uri), "workflow_id": row.id, "owner": row.name},
    )


def _refuse(state: ServerState, me: SupervisorPrincipal, path: str, refusal: _Refusal) -> None:
    audit(
        state,
        "request_denied",
        actor=me.name,
        subject=me.supervisor_id,
        detail={"path": path, "code": "not_owner", "status": 403, **refusal.detail},
    )
    raise forbidden(refusal.message, "not_owner")


_JOBS = table_of(ParseJob)
_NEW_PARSE_JOB = insert(_JOBS)
_SOURCES = table_of(SourceFile)
# The first report of a file makes its owner; a later one (by anyone) changes nothing, and
# two supervisors reporting a new file at once cannot both become its owner.
_NEW_SOURCE = {
    "sqlite": sqlite_insert(_SOURCES).on_conflict_do_nothing(index_elements=[_SOURCES.c.uri]),
    "postgresql": pg_insert(_SOURCES).on_conflict_do_nothing(index_elements=[_SOURCES.c.uri]),
}


def queue_parse_jobs(
    state: ServerState, me: SupervisorPrincipal, path: str, jobs: list[ParseJobRequest]
) -> list[str]:
    """Queue a parse of each of ``jobs`` for ``me``, all or none; their ids, in order.
    Raises 403 ``not_owner`` (and queues nothing) when one names another supervisor's file
    or workflow. ``path`` is the route, for the audit record of a refusal."""
    ids = [new_id() for _ in jobs]
    uris = [plain_uri(job.uri) for job in jobs]
    wanted = {
        workflow_id: uri
        for job, uri in zip(jobs, uris, strict=True)
        for workflow_id in job.workflow_ids or ()
    }
    try:
        with state.db.write_session() as session:
            refusal = _foreign_file(session, me, uris) or _foreign_workflow(session, me, wanted)
            if refusal is None:
                session.execute(
                    for_dialect(session, _NEW_SOURCE),
                    [{"uri": uri, "supervisor_id": me.supervisor_id} for uri in sorted(set(uris))],
                )
                # Lost a race to another supervisor's first report of the same file.
                refusal = _foreign_file(session, me, uris)
            if refusal is not None:
                raise _Refused(refusal)
            session.execute(
                _NEW_PARSE_JOB,
                [
                    {
                        "id": job_id,
                        "uri": job.uri,
                        "content_hash": job.content_hash or None,
                        "bundle_version": job.bundle_version,
                        "workflow_ids": job.workflow_ids,
                        "queued_by": me.supervisor_id,
                    }
                    for job_id, job in zip(ids, jobs, strict=True)
                ],
            )
            note_ready(session, "parse", ids)
    except _Refused as exc:
        _refuse(state, me, path, exc.refusal)
    return ids


def deactivate_deleted(
    state: ServerState, me: SupervisorPrincipal, path: str, uris: list[str]
) -> None:
    """Deactivate the workflows parsed from the files ``me`` saw disappear. Raises 403
    ``not_owner`` (and changes nothing) when one of them is another supervisor's."""
    plain = sorted({plain_uri(uri) for uri in uris})
    try:
        with state.db.write_session() as session:
            refusal = _foreign_file(session, me, plain) or _foreign_source(session, me, plain)
            if refusal is not None:
                raise _Refused(refusal)
            for chunk in _chunks(plain):
                session.execute(
                    update(Workflow).where(Workflow.source_uri.in_(chunk)).values(active=False)
                )
    except _Refused as exc:
        _refuse(state, me, path, exc.refusal)
