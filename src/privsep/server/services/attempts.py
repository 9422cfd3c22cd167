"""What one running task attempt may do, and only to itself: the operations behind the task
routes (:mod:`privsep.server.routes.task`) and the fast path (:mod:`privsep.server.fastpath`),
written once so that both answer from the same code.

A task token changes only its own attempt's state and writes only its own XComs. It reads
XComs of its own run, and variables and connections that operator policy grants to its
workflow.

Every operation checks "still running, same try, same execution, same supervisor, and that
supervisor still active" in the same statement or transaction that does its work, so a token
cannot race its own attempt's end, and a request costs one database round trip:

* reads (:func:`read_context`, :func:`read_variable`, :func:`read_xcom`,
  :func:`read_connection`) are one statement on a read-only driver connection that returns
  the attempt's state, its workflow, the policy grants of that kind and the value together;
  the grants are matched here, with ``fnmatch``;
* writes run in one write transaction that locks the attempt (or ends it with a conditional
  UPDATE), checks it and the grants, then writes.

Refusals are raised as :class:`~privsep.server.auth.Denied`; the caller audits them once the
transaction is over.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import timedelta
from fnmatch import fnmatchcase
from typing import Any, Final, TypeVar

from sqlalchemy import bindparam, delete, insert, select, update
from sqlalchemy.orm import Session

from privsep.server.auth import (
    ATTEMPT_COLUMN_COUNT,
    ATTEMPT_COLUMNS,
    ATTEMPT_FROM,
    Denied,
    TaskPrincipal,
    TaskToken,
    check_attempt,
    load_task_principal,
    revoked,
)
from privsep.server.db.models import (
    AttemptState,
    GrantKind,
    PolicyGrant,
    Run,
    Supervisor,
    TaskAttempt,
    Trigger,
    Variable,
    XCom,
    utcnow,
)
from privsep.server.errors import forbidden, not_found
from privsep.server.readpool import ReadPool
from privsep.server.routes._sql import affected
from privsep.server.runs import advance_run, fail_or_retry
from privsep.server.schemas import SerializedTrigger, TaskContext
from privsep.server.state import ServerState

T = TypeVar("T")

# --- policy ----------------------------------------------------------------------------------


def require_grant(
    token: TaskToken,
    grants: Iterable[tuple[str, str]],
    workflow_id: str,
    kind: GrantKind,
    name: str,
) -> None:
    """Deny (403 ``not_granted``, audited) unless a ``(workflow_pattern, name_pattern)`` of
    ``grants`` matches this workflow and ``name``."""
    if not any(fnmatchcase(workflow_id, wf) and fnmatchcase(name, nm) for wf, nm in grants):
        raise Denied(
            forbidden(
                f"policy grants workflow {workflow_id!r} no access to this {kind.value}",
                "not_granted",
            ),
            token.attempt_id,
            {"code": "not_granted", "kind": kind.value},
        )


# --- one-statement reads ---------------------------------------------------------------------
#
# Each statement returns one row tagged 'a' (the attempt, its workflow and the resource,
# left-joined so a missing resource is NULLs) and, for policy-checked reads, one row tagged
# 'g' per grant of the kind asked for. The two halves of the UNION share their column names:
# the attempt row leaves the grant's patterns NULL and the grant rows leave the rest NULL.

_FROM_ATTEMPT = ATTEMPT_FROM


def _with_grants(columns: str, joins: str, width: int) -> str:
    """The attempt row (``ATTEMPT_COLUMNS`` and ``width`` more ``columns``) and the grant rows."""
    nulls = ", NULL" * (ATTEMPT_COLUMN_COUNT + width)
    return (
        "SELECT 'a' AS tag, NULL AS workflow_pattern, NULL AS name_pattern, "  # noqa: S608
        f"{ATTEMPT_COLUMNS}, {columns} {_FROM_ATTEMPT} {joins} WHERE a.id = :attempt UNION ALL "
        f"SELECT 'g', g.workflow_pattern, g.name_pattern{nulls} FROM policy_grants g "
        "WHERE g.kind = :kind"
    )


_VARIABLE_SQL = _with_grants("v.value", "LEFT JOIN variables v ON v.key = :key", 1)

CONNECTION_FIELDS = (
    "conn_id",
    "conn_type",
    "host",
    "port",
    "login",
    "password_encrypted",
    "schema",
    "extra_encrypted",
)
_CONNECTION_SQL = _with_grants(
    ", ".join(f"c.{name}" for name in CONNECTION_FIELDS),
    "LEFT JOIN connections c ON c.conn_id = :conn_id",
    len(CONNECTION_FIELDS),
)

# JSON is stored as text on SQLite (where a bare number comes back as a number, because of the
# column's affinity) and as ``json`` on PostgreSQL (cast to its text here): see _json_value.
_XCOM_SQL = (
    f"SELECT {ATTEMPT_COLUMNS}, x.value AS value, x.id AS xcom_id {_FROM_ATTEMPT} "
    "LEFT JOIN xcoms x ON x.run_id = a.run_id AND x.task_id = :task_id AND x.key = :key "
    "WHERE a.id = :attempt"
)
_XCOM_SQL_PG = _XCOM_SQL.replace("x.value AS", "CAST(x.value AS TEXT) AS")

_CONTEXT_SQL = (
    f"SELECT {ATTEMPT_COLUMNS}, r.conf AS conf, a.trigger_event AS trigger_event "
    f"{_FROM_ATTEMPT} WHERE a.id = :attempt"
)
_CONTEXT_SQL_PG = _CONTEXT_SQL.replace(
    "r.conf AS conf, a.trigger_event AS",
    "CAST(r.conf AS TEXT) AS conf, CAST(a.trigger_event AS TEXT) AS",
)


def _only(rows: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    return rows[0] if rows else None


def _checked(
    token: TaskToken, rows: Sequence[Mapping[str, Any]], kind: GrantKind, name: str
) -> Mapping[str, Any]:
    """The attempt row of a policy-checked read, once the attempt and the grant are checked."""
    attempt = _only([row for row in rows if row["tag"] == "a"])
    grants = [(row["workflow_pattern"], row["name_pattern"]) for row in rows if row["tag"] == "g"]
    me = check_attempt(token, attempt)
    require_grant(token, grants, me.workflow_id, kind, name)
    assert attempt is not None  # noqa: S101 - check_attempt refused otherwise
    return attempt


def _json_value(stored: Any) -> Any:
    return json.loads(stored) if isinstance(stored, str) else stored


# What a task's context says of it: the principal's fields, all but its supervisor.
_PRINCIPAL_IN_CONTEXT = ("attempt_id", "run_id", "workflow_id", "task_id", "try_number")


def read_context(reads: ReadPool, token: TaskToken) -> TaskContext:
    """The attempt's context (run, workflow, task, try, params, trigger event), if it is
    live: one statement."""
    sql = reads.sql(_CONTEXT_SQL, _CONTEXT_SQL_PG)
    row = _only(reads.fetch(sql, {"attempt": token.attempt_id}))
    me = check_attempt(token, row)
    assert row is not None  # noqa: S101 - check_attempt refused otherwise
    return TaskContext(
        **{name: getattr(me, name) for name in _PRINCIPAL_IN_CONTEXT},
        params=_json_value(row["conf"]) or {},
        trigger_event=_json_value(row["trigger_event"]),
    )


def read_variable(reads: ReadPool, token: TaskToken, key: str) -> str:
    """The value of variable ``key``, if the attempt is live and policy grants it."""
    params = {"attempt": token.attempt_id, "key": key, "kind": GrantKind.VARIABLE.value}
    row = _checked(token, reads.fetch(reads.sql(_VARIABLE_SQL), params), GrantKind.VARIABLE, key)
    if row["value"] is None:
        raise not_found(f"no variable {key!r}")
    return str(row["value"])


def read_xcom(reads: ReadPool, token: TaskToken, task_id: str, key: str) -> Any:
    """An XCom of ``task_id`` in the caller's own run, if the attempt is live."""
    params = {"attempt": token.attempt_id, "task_id": task_id, "key": key}
    row = _only(reads.fetch(reads.sql(_XCOM_SQL, _XCOM_SQL_PG), params))
    check_attempt(token, row)
    assert row is not None  # noqa: S101 - check_attempt refused otherwise
    if row["xcom_id"] is None:  # no such XCom (a stored one's id is never NULL)
        raise not_found(f"no XCom {key!r} from task {task_id!r} in this run")
    return _json_value(row["value"])


def read_connection(reads: ReadPool, token: TaskToken, conn_id: str) -> dict[str, Any]:
    """The connection's :data:`CONNECTION_FIELDS` (secrets still encrypted), if the attempt
    is live and policy grants it."""
    params = {"attempt": token.attempt_id, "conn_id": conn_id, "kind": GrantKind.CONNECTION.value}
    rows = reads.fetch(reads.sql(_CONNECTION_SQL), params)
    row = _checked(token, rows, GrantKind.CONNECTION, conn_id)
    if row["conn_id"] is None:
        raise not_found(f"no connection {conn_id!r}")
    return {name: row[name] for name in CONNECTION_FIELDS}


# --- writes ----------------------------------------------------------------------------------


# "The attempt's supervisor is still registered and active", for the conditional UPDATEs that
# check an attempt without reading it first.
_SUPERVISOR_ACTIVE = (
    select(Supervisor.id)
    .where(Supervisor.id == TaskAttempt.supervisor_id, Supervisor.active.is_(True))
    .exists()
)


def beat(state: ServerState, token: TaskToken) -> None:
    """Record a heartbeat, in one conditional UPDATE: only a live attempt's row matches."""
    with state.db.write_session() as session:
        updated = affected(
            session,
            update(TaskAttempt)
            .where(
                TaskAttempt.id == token.attempt_id,
                TaskAttempt.state == AttemptState.RUNNING,
                TaskAttempt.try_number == token.try_number,
                TaskAttempt.execution == token.execution,
                TaskAttempt.supervisor_id == token.supervisor_id,
                _SUPERVISOR_ACTIVE,
            )
            .values(heartbeat_at=utcnow())
            .execution_options(synchronize_session=False),
        )
    if not updated:
        load_task_principal(state, token)  # raises the refusal that says why, or else:
        raise revoked(token, "the attempt this token was issued for is no longer running")


def own_running_attempt(session: Session, token: TaskToken) -> tuple[TaskAttempt, TaskPrincipal]:
    """The caller's attempt, locked for this transaction, still running as the token says."""
    row = session.execute(
        select(TaskAttempt, Run.workflow_id, Supervisor.active)
        .join(Run, Run.id == TaskAttempt.run_id)
        .outerjoin(Supervisor, Supervisor.id == TaskAttempt.supervisor_id)
        .where(TaskAttempt.id == token.attempt_id)
        .with_for_update(of=TaskAttempt)
    ).first()
    if row is None:
        raise revoked(token, "no such attempt")
    attempt = row.TaskAttempt
    me = check_attempt(
        token,
        {
            "state": attempt.state,
            "supervisor_id": attempt.supervisor_id,
            "try_number": attempt.try_number,
            "execution": attempt.execution,
            "run_id": attempt.run_id,
            "task_id": attempt.task_id,
            "workflow_id": row.workflow_id,
            "supervisor_active": row.active,
        },
    )
    return attempt, me


# What each report's repeat finds once the first one was applied, and the answer it gets: the
# state the report put the attempt in. A deferred attempt becomes queued again (same row, same
# execution) when its trigger fires, and is still the same report's work until a new claim.
ENDED_BY: Final[dict[str, tuple[frozenset[AttemptState], AttemptState | None]]] = {
    "succeed": (frozenset({AttemptState.SUCCESS}), None),
    "fail": (frozenset({AttemptState.FAILED}), None),
    "retry": (frozenset({AttemptState.FAILED, AttemptState.UP_FOR_RETRY}), None),
    "defer": (frozenset({AttemptState.DEFERRED, AttemptState.QUEUED}), AttemptState.DEFERRED),
}


def repeated_report(session: Session, token: TaskToken, report: str) -> AttemptState | None:
    """The answer the first ``report`` of the token's execution got, if this is a repeat of it.

    A report whose answer was lost (a replica that died between commit and reply, a reset
    connection, a 503 from a proxy that had passed it on) is sent again, and must get the
    original answer rather than a refusal, or the sandbox would count it as failed and the
    task would run again. Only the execution the token was issued for qualifies: the attempt
    has the token's try and execution and is in a state that report leads to. Read only on
    the refusal path, so a first report costs nothing more."""
    states, answer = ENDED_BY[report]
    row = session.execute(
        select(TaskAttempt.state, TaskAttempt.try_number, TaskAttempt.execution).where(
            TaskAttempt.id == token.attempt_id
        )
    ).first()
    if (
        row is None
        or row.try_number != token.try_number
        or row.execution != token.execution
        or row.state not in states
    ):
        return None
    return answer or row.state


def report_once(
    state: ServerState,
    token: TaskToken,
    report: str,
    work: Callable[[Session, TaskAttempt, TaskPrincipal], AttemptState],
) -> AttemptState:
    """``work`` on the caller's running attempt, as :func:`in_own_attempt`; a repeat of a
    report this execution already made gets that report's answer (:func:`repeated_report`)."""
    with state.db.write_session() as session:
        try:
            attempt, me = own_running_attempt(session, token)
        except Denied:
            repeat = repeated_report(session, token, report)
            if repeat is None:
                raise
            return repeat
        answer = work(session, attempt, me)
    state.token_cache.forget_subject(token.attempt_id)  # committed: its tokens are spent
    return answer


def in_own_attempt(
    state: ServerState, token: TaskToken, work: Callable[[Session, TaskAttempt, TaskPrincipal], T]
) -> T:
    """``work(session, attempt, me)`` in one write transaction that holds the caller's attempt
    locked and checked: the shape of every task write but the hottest two."""
    with state.db.write_session() as session:
        attempt, me = own_running_attempt(session, token)
        return work(session, attempt, me)


def put_xcom(session: Session, run_id: str, task_id: str, key: str, value: object) -> None:
    """Insert or replace one XCom, with Core statements (no ORM objects: cheaper, and nothing
    of it is read back in the transaction)."""
    replaced = affected(
        session,
        update(XCom)
        .where(XCom.run_id == run_id, XCom.task_id == task_id, XCom.key == key)
        .values(value=value, created_at=utcnow())
        .execution_options(synchronize_session=False),
    )
    if not replaced:
        session.execute(insert(XCom).values(run_id=run_id, task_id=task_id, key=key, value=value))


def push_xcom(state: ServerState, token: TaskToken, key: str, value: object) -> None:
    """Write an XCom of the caller's task in its run; there is no way to name another task."""
    in_own_attempt(
        state, token, lambda session, _, me: put_xcom(session, me.run_id, me.task_id, key, value)
    )


# Built once: constructing a statement costs about as much Python as executing it.
_END_AS_SUCCESS = (
    update(TaskAttempt)
    .where(
        TaskAttempt.id == bindparam("b_attempt_id"),
        TaskAttempt.state == AttemptState.RUNNING,
        TaskAttempt.try_number == bindparam("b_try_number"),
        TaskAttempt.execution == bindparam("b_execution"),
        TaskAttempt.supervisor_id == bindparam("b_supervisor_id"),
        _SUPERVISOR_ACTIVE,
    )
    .values(state=AttemptState.SUCCESS, ended_at=bindparam("b_now"))
    .returning(TaskAttempt.run_id, TaskAttempt.task_id)
    .execution_options(synchronize_session=False)
)


def finish_success(state: ServerState, token: TaskToken, return_value: Any) -> None:
    """End the token's attempt as a success, store its return value, move the run on.

    The attempt is checked and ended by one conditional UPDATE (only a running attempt with
    the token's try, execution and active supervisor matches); when it matches nothing, the
    attempt is read again to say why. The rest is Core statements: the ORM's unit of work cost
    more than the statements themselves on the hottest write a task makes."""
    with state.db.write_session() as session:
        ended = session.execute(
            _END_AS_SUCCESS,
            {
                "b_attempt_id": token.attempt_id,
                "b_try_number": token.try_number,
                "b_execution": token.execution,
                "b_supervisor_id": token.supervisor_id,
                "b_now": utcnow(),
            },
        ).first()
        if ended is None:
            if repeated_report(session, token, "succeed") is not None:
                return  # applied already: the first report's answer was lost
            own_running_attempt(session, token)  # raises the refusal that says why
            raise revoked(token, "the attempt this token was issued for is no longer running")
        if return_value is not None:
            put_xcom(session, ended.run_id, ended.task_id, "return_value", return_value)
        advance_run(session, ended.run_id, ended.task_id)
    state.token_cache.forget_subject(token.attempt_id)  # committed: its tokens are spent


def finish_failure(
    state: ServerState, token: TaskToken, error: str, *, allow_retry: bool
) -> AttemptState:
    """End the token's attempt as failed, or up for retry when ``allow_retry`` and the task
    has tries left (the task's definition decides, never the caller)."""
    return report_once(
        state,
        token,
        "retry" if allow_retry else "fail",
        lambda session, attempt, _: fail_or_retry(session, attempt, error, allow_retry=allow_retry),
    )


def defer(
    state: ServerState, token: TaskToken, trigger: SerializedTrigger, timeout: float | None
) -> AttemptState:
    """Park the attempt on a trigger. No sandbox is held while it waits; when the trigger
    fires, the attempt is queued again (same try) with the event in its context."""

    def park(session: Session, attempt: TaskAttempt, _: TaskPrincipal) -> AttemptState:
        parked = Trigger(attempt_id=attempt.id, serialized=trigger.model_dump())
        session.add(parked)
        session.flush()
        attempt.state = AttemptState.DEFERRED
        attempt.trigger_id = parked.id
        attempt.supervisor_id = None
        if timeout is not None:
            attempt.next_try_at = utcnow() + timedelta(seconds=timeout)
        return attempt.state

    return report_once(state, token, "defer", park)


def _granted_variable(session: Session, token: TaskToken, me: TaskPrincipal, key: str) -> None:
    rows = session.execute(
        select(PolicyGrant.workflow_pattern, PolicyGrant.name_pattern).where(
            PolicyGrant.kind == GrantKind.VARIABLE
        )
    )
    grants = [(row.workflow_pattern, row.name_pattern) for row in rows]
    require_grant(token, grants, me.workflow_id, GrantKind.VARIABLE, key)


def set_variable(state: ServerState, token: TaskToken, key: str, value: str) -> None:
    """Write a variable that policy grants to the attempt's workflow."""

    def write(session: Session, _: TaskAttempt, me: TaskPrincipal) -> None:
        _granted_variable(session, token, me, key)
        variable = session.get(Variable, key)
        if variable is None:
            session.add(Variable(key=key, value=value))
        else:
            variable.value = value

    in_own_attempt(state, token, write)


def delete_variable(state: ServerState, token: TaskToken, key: str) -> None:
    """Delete a variable that policy grants to the attempt's workflow."""

    def remove(session: Session, _: TaskAttempt, me: TaskPrincipal) -> None:
        _granted_variable(session, token, me, key)
        if not affected(session, delete(Variable).where(Variable.key == key)):
            raise not_found(f"no variable {key!r}")

    in_own_attempt(state, token, remove)
