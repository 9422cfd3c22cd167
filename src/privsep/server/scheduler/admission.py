"""Concurrency admission: which queued attempts a claim may start under the running limits.

This module changes when the limits or the claim's candidate order change. It is the one place
the claim route gets its candidates from, so that every claim counts against the same limits.

:func:`claim_candidates` is the claim route's candidate query with a per-workflow and a global
limit on running attempts built in; :func:`admit` cuts an existing candidate list down to what
the limits allow.

Both count RUNNING attempts (deferred ones hold no sandbox and do not count) in the claim's own
transaction, after serializing claims, so their counts cannot go stale before the claim's
conditional UPDATEs commit:

* SQLite: write transactions are ``BEGIN IMMEDIATE``, so claims are already serialized.
* PostgreSQL: they take the transaction-scoped advisory lock :data:`CLAIM_LOCK_KEY` first (only
  when a limit is set), and under READ COMMITTED each later statement sees everything the
  previous holder committed before releasing it. This relies on READ COMMITTED, the server's
  default; under REPEATABLE READ the counts would come from the transaction's first snapshot.

So limits are exact on both backends as long as every claim goes through one of these
functions. The price on PostgreSQL is that claims (one short transaction each) run one at a
time across replicas while a limit is configured; without limits nothing is locked.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Final, cast

from sqlalchemy import Integer, Subquery, Table, bindparam, func, or_, select
from sqlalchemy.orm import Session

from privsep.server.db.models import AttemptState, Run, TaskAttempt
from privsep.server.scheduler.clock import require_aware

CLAIM_LOCK_KEY: Final = 0x7072_6976_7365_7031  # b"privsep1": fits a signed 64-bit key
"""The PostgreSQL advisory lock that serializes claim transactions while limits are on."""


def _check_limits(per_workflow: int | None, global_limit: int | None) -> bool:
    """Whether any limit is set; refuses negative ones."""
    for limit in (per_workflow, global_limit):
        if limit is not None and limit < 0:
            raise ValueError("concurrency limits must be >= 0 or None")
    return per_workflow is not None or global_limit is not None


def _serialize_claims(session: Session) -> None:
    if session.get_bind().dialect.name == "postgresql":
        session.execute(select(func.pg_advisory_xact_lock(CLAIM_LOCK_KEY)))


def _running_total(session: Session) -> int:
    count = session.scalar(
        select(func.count())
        .select_from(TaskAttempt)
        .where(TaskAttempt.state == AttemptState.RUNNING)
    )
    return int(count or 0)


def _running_per_workflow() -> Subquery:
    """A subquery: (workflow_id, n) for every workflow with running attempts."""
    return (
        select(Run.workflow_id.label("workflow_id"), func.count().label("n"))
        .select_from(TaskAttempt)
        .join(Run, Run.id == TaskAttempt.run_id)
        .where(TaskAttempt.state == AttemptState.RUNNING)
        .group_by(Run.workflow_id)
        .subquery("running")
    )


_ATTEMPTS = cast(Table, TaskAttempt.__table__)
# The candidate query without limits, built once as a Core statement on the table: every claim
# runs it, most often to find nothing queued, and building it cost more than running it.
_READY_OLDEST = (
    select(_ATTEMPTS.c.id)
    .where(
        _ATTEMPTS.c.state == AttemptState.QUEUED,
        or_(_ATTEMPTS.c.next_try_at.is_(None), _ATTEMPTS.c.next_try_at <= bindparam("b_now")),
    )
    .order_by(_ATTEMPTS.c.created_at, _ATTEMPTS.c.id)
    .limit(bindparam("b_limit", type_=Integer))
)
# The same, for a claimer that serves only some work queues.
_READY_OLDEST_OF_QUEUES = _READY_OLDEST.where(
    _ATTEMPTS.c.queue.in_(bindparam("b_queues", expanding=True))
)


def claim_candidates(
    session: Session,
    now: datetime,
    want: int,
    *,
    per_workflow: int | None = None,
    global_limit: int | None = None,
    queues: Sequence[str] | None = None,
) -> list[str]:
    """The queued, due attempts (ids, oldest first) a claim of ``want`` items should take.

    Only attempts on one of ``queues`` (the work queues the claimer serves), when given.

    This is the claim route's candidate query with the concurrency limits built in. With no
    limit it is exactly the route's current query (``want x 4`` candidates, for lost races).
    With limits it serializes claims (see the module's doc) and returns at most ``want`` ids
    that all fit: at most ``global_limit - running`` in total, and per workflow at most
    ``per_workflow - running in that workflow``, its oldest first. Selecting per workflow in
    SQL (a window function) matters: a busy workflow's backlog can never fill the candidate
    window and starve other workflows that still have room, as filtering an "oldest N" list
    afterwards would.
    """
    now = require_aware(now)
    if want <= 0:
        return []
    if not _check_limits(per_workflow, global_limit):
        if queues is None:
            return list(session.scalars(_READY_OLDEST, {"b_now": now, "b_limit": want * 4}))
        return list(
            session.scalars(
                _READY_OLDEST_OF_QUEUES,
                {"b_now": now, "b_limit": want * 4, "b_queues": list(queues)},
            )
        )
    ready = [
        TaskAttempt.state == AttemptState.QUEUED,
        or_(TaskAttempt.next_try_at.is_(None), TaskAttempt.next_try_at <= now),
    ]
    if queues is not None:
        ready.append(TaskAttempt.queue.in_(list(queues)))
    oldest = (TaskAttempt.created_at, TaskAttempt.id)
    _serialize_claims(session)
    budget = want
    if global_limit is not None:
        budget = min(budget, global_limit - _running_total(session))
    if budget <= 0:
        return []
    if per_workflow is None:
        return list(
            session.scalars(select(TaskAttempt.id).where(*ready).order_by(*oldest).limit(budget))
        )
    ranked = (
        select(
            TaskAttempt.id.label("id"),
            TaskAttempt.created_at.label("created_at"),
            Run.workflow_id.label("workflow_id"),
            func.row_number().over(partition_by=Run.workflow_id, order_by=oldest).label("rank"),
        )
        .join(Run, Run.id == TaskAttempt.run_id)
        .where(*ready)
        .subquery("ranked")
    )
    running = _running_per_workflow()
    query = (
        select(ranked.c.id)
        .outerjoin(running, running.c.workflow_id == ranked.c.workflow_id)
        .where(ranked.c.rank <= per_workflow - func.coalesce(running.c.n, 0))
        .order_by(ranked.c.created_at, ranked.c.id)
        .limit(budget)
    )
    return list(session.scalars(query))


def admit(
    session: Session,
    candidates: Sequence[str],
    *,
    per_workflow: int | None = None,
    global_limit: int | None = None,
) -> list[str]:
    """The candidates (attempt ids, in the given order) the concurrency limits let start now.

    For a caller that already has its candidates: call it in the claim transaction, before the
    conditional ``queued -> running`` UPDATEs, and claim only what it returns. It walks the
    candidates in order, admitting each while the global and its workflow's running counts
    (plus those admitted so far) stay under their limits, and leaves out candidates that are no
    longer queued. ``None`` means no limit; with neither set the (deduplicated) candidates come
    back unchanged and nothing is locked. Never exceeds a limit (see the module's doc);
    it can undershoot when the candidate list holds too few admissible attempts, which is what
    :func:`claim_candidates` avoids.
    """
    unique = list(dict.fromkeys(candidates))
    if not unique or not _check_limits(per_workflow, global_limit):
        return unique
    _serialize_claims(session)
    workflow_of: dict[str, str] = {
        row.id: row.workflow_id
        for row in session.execute(
            select(TaskAttempt.id, Run.workflow_id)
            .join(Run, Run.id == TaskAttempt.run_id)
            .where(TaskAttempt.id.in_(unique), TaskAttempt.state == AttemptState.QUEUED)
        )
    }
    total = _running_total(session) if global_limit is not None else 0
    running: dict[str, int] = {}
    if per_workflow is not None and workflow_of:
        counts = _running_per_workflow()
        running = {
            row.workflow_id: int(row.n)
            for row in session.execute(
                select(counts.c.workflow_id, counts.c.n).where(
                    counts.c.workflow_id.in_(set(workflow_of.values()))
                )
            )
        }
    admitted: list[str] = []
    for attempt_id in unique:
        workflow_id = workflow_of.get(attempt_id)
        if workflow_id is None:
            continue
        if global_limit is not None and total >= global_limit:
            break
        if per_workflow is not None and running.get(workflow_id, 0) >= per_workflow:
            continue
        admitted.append(attempt_id)
        total += 1
        running[workflow_id] = running.get(workflow_id, 0) + 1
    return admitted
