"""Claims: a supervisor takes queued work (task attempts, parse jobs, trigger batches), each
with a work token bound to it. Written once for the route
(:mod:`privsep.server.routes.supervisor`) and the fast path (:mod:`privsep.server.fastpath`),
which send the very bytes :func:`claim_work` makes.

The supervisor is trusted to run work, never to choose whose work it is: each item moves
queued → running in a conditional UPDATE, so two supervisors racing for it cannot both win.
"""

from __future__ import annotations

import uuid
from typing import Any

from pydantic_core import to_json
from sqlalchemy import Integer, Table, Update, bindparam, insert, select, update
from sqlalchemy.orm import Session

from privsep.secrets.tokens import Token, issue_token
from privsep.server.auth import EXECUTION, SupervisorPrincipal
from privsep.server.db.models import (
    AttemptState,
    AuditLog,
    ParseJob,
    ParseJobState,
    Run,
    Supervisor,
    TaskAttempt,
    Trigger,
    TriggerState,
    WorkflowVersion,
    utcnow,
)
from privsep.server.errors import unauthorized
from privsep.server.metrics import CLAIMED, TOKENS_ISSUED
from privsep.server.routes._sql import affected, table_of
from privsep.server.runs import version_graph
from privsep.server.scheduler import claim_candidates
from privsep.server.schemas import ClaimRequest, ClaimResponse, ParseWork, TaskWork, TriggerWork
from privsep.server.state import ServerState


def issue_work_token(
    state: ServerState, scope: str, subject: str, ttl: int, extra: dict[str, object] | None = None
) -> Token:
    """A work token (or any token this server signs) for ``subject`` in ``scope``."""
    settings = state.settings
    token = issue_token(
        state.signer,
        issuer=settings.issuer,
        audience=settings.audience,
        subject=subject,
        scope=scope,  # type: ignore[arg-type]
        ttl_seconds=ttl,
        extra=extra,
    )
    TOKENS_ISSUED.labels(scope).inc()
    return token


def _issued(
    state: ServerState,
    me: SupervisorPrincipal,
    scope: str,
    item_id: str,
    extra: dict[str, object] | None = None,
) -> dict[str, Any]:
    """The ``id``, ``token`` and ``expires_at`` of a claimed item: a work token for it, bound
    to the claiming supervisor (``sup``)."""
    token = issue_work_token(
        state,
        scope,
        item_id,
        state.settings.work_token_ttl,
        {**(extra or {}), "sup": me.supervisor_id},
    )
    return {"id": item_id, "token": token.reveal(), "expires_at": token.exp}


def claim_work(state: ServerState, me: SupervisorPrincipal, body: ClaimRequest) -> bytes:
    """The claim itself (see :func:`claim`): its :class:`ClaimResponse` as JSON bytes, made
    before the transaction commits, so that if making them failed nothing was claimed. The
    route and the fast path send these very bytes."""
    items: list[TaskWork | ParseWork | TriggerWork] = []
    with state.db.write_session() as session:
        _still_granted(session, me)
        if "task" in body.kinds:
            items += _claim_tasks(session, state, me, body.max_items, body.queues)
        if "parse" in body.kinds and len(items) < body.max_items:
            items += _claim_parse(session, state, me, body.max_items - len(items))
        if "trigger" in body.kinds and len(items) < body.max_items:
            items += _claim_triggers(session, state, me)
        # Recorded in the claim's own transaction: a token is issued exactly when the claim
        # commits (it is only revealed in the answer, after the commit).
        if items:  # one Core INSERT: ORM objects cost more to flush than the rows to write
            now = utcnow()
            session.execute(
                _AUDIT_INSERT,
                [
                    {
                        "event": "token_issued",
                        "actor": me.name,
                        "subject": item.id,
                        "detail": {"scope": item.kind},
                        "at": now,
                    }
                    for item in items
                ],
            )
        answer = to_json(ClaimResponse(items=items).model_dump(mode="json"))
    for item in items:  # committed: counted once, whichever path answered
        CLAIMED.labels(item.kind).inc()
    return answer


def _still_granted(session: Session, me: SupervisorPrincipal) -> None:
    """Refuse (401 ``revoked``) unless the claimer is still active under the key generation its
    session was opened with, read in the claim's own transaction with the supervisor's row
    locked against a revocation: a revocation either sees this claim's items (and takes them
    back) or this claim sees the revocation, never neither."""
    row = session.execute(_GRANT, {"b_supervisor_id": me.supervisor_id}).first()
    if row is None or not row.active or row.key_generation != me.generation:
        raise unauthorized("revoked", "this supervisor was revoked or re-keyed")


# Built once, as Core statements on the tables (see privsep.server.routes._sql): a claim is
# the server's busiest write, and an ORM statement rebuilt per call cost more than its SQL.
_ATTEMPTS = table_of(TaskAttempt)
_RUNS = table_of(Run)
_SUPERVISORS = table_of(Supervisor)
_GRANT = (
    select(_SUPERVISORS.c.active, _SUPERVISORS.c.key_generation)
    .where(_SUPERVISORS.c.id == bindparam("b_supervisor_id"))
    .with_for_update(read=True)
)
_AUDIT_INSERT = insert(table_of(AuditLog))


def _take_queued(table: Table, queued: object, running: object, **values: Any) -> Update:
    """The conditional UPDATE of a claim, built once: the rows named in ``b_ids`` that are
    still ``queued`` become ``running`` (plus ``values``) for ``b_supervisor_id``. A row
    another claimer took since the candidate query is simply not updated, nor returned."""
    return (
        update(table)
        .where(table.c.id.in_(bindparam("b_ids", expanding=True)), table.c.state == queued)
        .values(state=running, supervisor_id=bindparam("b_supervisor_id"), **values)
    )


_TAKE_ATTEMPTS = _take_queued(
    _ATTEMPTS,
    AttemptState.QUEUED,
    AttemptState.RUNNING,
    started_at=bindparam("b_now"),
    heartbeat_at=bindparam("b_now"),
    # A new execution: no token of an earlier claim of this row holds for it.
    execution=_ATTEMPTS.c.execution + 1,
).returning(
    _ATTEMPTS.c.id,
    _ATTEMPTS.c.run_id,
    _ATTEMPTS.c.task_id,
    _ATTEMPTS.c.try_number,
    _ATTEMPTS.c.execution,
    _ATTEMPTS.c.trigger_event,
)
_RUNS_OF_ATTEMPTS = select(
    _RUNS.c.id, _RUNS.c.workflow_id, _RUNS.c.workflow_version_id, _RUNS.c.conf
).where(_RUNS.c.id.in_(bindparam("b_ids", expanding=True)))


def _claim_tasks(
    session: Session,
    state: ServerState,
    me: SupervisorPrincipal,
    limit: int,
    queues: list[str] | None,
) -> list[TaskWork | ParseWork | TriggerWork]:
    """Queued attempts, taken in one conditional UPDATE for the lot: a row another claimer
    took since the candidate query is no longer queued, so it is simply not updated (and not
    returned). Each item carries what the task's context holds (its run's params, the event
    that resumed it), so the sandbox need not ask for it before user code runs."""
    now = utcnow()
    candidates = claim_candidates(
        session,
        now,
        limit,
        per_workflow=state.settings.max_running_per_workflow or None,
        global_limit=state.settings.max_running_total or None,
        queues=queues,
    )
    if not candidates:
        return []
    won = session.execute(
        _TAKE_ATTEMPTS,
        {"b_ids": candidates[:limit], "b_supervisor_id": me.supervisor_id, "b_now": now},
    ).all()
    if not won:
        return []
    runs = {
        row.id: row
        for row in session.execute(_RUNS_OF_ATTEMPTS, {"b_ids": sorted({a.run_id for a in won})})
    }
    order = {attempt_id: index for index, attempt_id in enumerate(candidates)}
    out: list[TaskWork | ParseWork | TriggerWork] = []
    for row in sorted(won, key=lambda row: order[row.id]):
        run = runs[row.run_id]
        graph = version_graph(session, run.workflow_version_id)
        task = graph.tasks.get(row.task_id)
        if task is None:
            raise LookupError(
                f"task {row.task_id!r} is not in workflow version {run.workflow_version_id}"
            )
        out.append(
            TaskWork(
                **_issued(
                    state, me, "task", row.id, {"try": row.try_number, EXECUTION: row.execution}
                ),
                run_id=row.run_id,
                workflow_id=run.workflow_id,
                task_id=row.task_id,
                try_number=row.try_number,
                callable={"module": task.module, "qualname": task.qualname},
                timeout=task.timeout,
                bundle_version=graph.bundle_version,
                source_uri=graph.source_uri,
                params=run.conf or {},
                trigger_event=row.trigger_event,
                execution=row.execution,
            )
        )
    return out


# Built once, as Core statements on the table (see privsep.server.routes._sql).
_JOBS = table_of(ParseJob)
_QUEUED_PARSE_JOBS = (
    select(_JOBS.c.id)
    .where(_JOBS.c.state == ParseJobState.QUEUED)
    .order_by(_JOBS.c.created_at)
    .limit(bindparam("b_limit", type_=Integer))
)
_TAKE_PARSE_JOBS = _take_queued(
    _JOBS, ParseJobState.QUEUED, ParseJobState.RUNNING, claimed_at=bindparam("b_now")
).returning(_JOBS.c.id, _JOBS.c.uri, _JOBS.c.bundle_version)


def _claim_parse(
    session: Session, state: ServerState, me: SupervisorPrincipal, limit: int
) -> list[TaskWork | ParseWork | TriggerWork]:
    candidates = session.scalars(_QUEUED_PARSE_JOBS, {"b_limit": limit * 4}).all()
    if not candidates:
        return []
    won = session.execute(
        _TAKE_PARSE_JOBS,
        {"b_ids": candidates[:limit], "b_supervisor_id": me.supervisor_id, "b_now": utcnow()},
    ).all()
    order = {job_id: index for index, job_id in enumerate(candidates)}
    out: list[TaskWork | ParseWork | TriggerWork] = []
    for job in sorted(won, key=lambda row: order[row.id]):
        out.append(
            ParseWork(
                **_issued(state, me, "parse", job.id),
                uri=job.uri,
                bundle_version=job.bundle_version,
            )
        )
    return out


def _claim_triggers(
    session: Session, state: ServerState, me: SupervisorPrincipal
) -> list[TaskWork | ParseWork | TriggerWork]:
    """The queued triggers of ONE workflow go to one batch: one sandbox, one event loop, one
    token. Two workflows never share a trigger sandbox, so one workflow's trigger code cannot
    see or disturb another's."""
    now = utcnow()
    rows = session.execute(
        select(Trigger.id, Run.workflow_id)
        .join(TaskAttempt, TaskAttempt.id == Trigger.attempt_id)
        .join(Run, Run.id == TaskAttempt.run_id)
        .where(Trigger.state == TriggerState.QUEUED)
        .order_by(Trigger.created_at)
        .limit(500)
    ).all()
    if not rows:
        return []
    workflow = rows[0].workflow_id
    ids = [row.id for row in rows if row.workflow_id == workflow][:100]
    won: list[str] = []
    for trigger_id in ids:
        if affected(
            session,
            update(Trigger)
            .where(Trigger.id == trigger_id, Trigger.state == TriggerState.QUEUED)
            .values(state=TriggerState.RUNNING, supervisor_id=me.supervisor_id, claimed_at=now),
        ):
            won.append(trigger_id)
    if not won:
        return []
    batch = f"batch-{uuid.uuid4()}"
    uris = session.scalars(
        select(WorkflowVersion.source_uri)
        .distinct()
        .join(Run, Run.workflow_version_id == WorkflowVersion.id)
        .join(TaskAttempt, TaskAttempt.run_id == Run.id)
        .join(Trigger, Trigger.attempt_id == TaskAttempt.id)
        .where(Trigger.id.in_(won))
    ).all()
    return [
        TriggerWork(
            **_issued(state, me, "trigger", batch, {"triggers": won}),
            trigger_ids=won,
            source_uris=sorted(u for u in uris if u),
        )
    ]
