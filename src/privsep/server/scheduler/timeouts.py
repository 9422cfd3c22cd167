"""Timeouts the server enforces itself: expired deferrals, and a backstop for running attempts.

This module changes when the rules for ending an overdue attempt change; each rule ends one
attempt per transaction through :func:`privsep.server.runs.fail_or_retry`, so the retry and
dependency rules stay where every other ending applies them.

* A deferred attempt whose ``next_try_at`` (set from the defer call's timeout) has passed
  fails, or is retried per its task's ``retries``, with "deferral timed out"; its trigger is
  cancelled so a late event cannot resume it.
* The supervisor's sandbox enforces a task's wall-clock ``timeout``. As a backstop for a
  supervisor that keeps heartbeating but never reports (a bug, a wedged executor), a running
  attempt whose ``started_at + timeout + grace`` has passed is failed or retried here.

Each of those writes re-checks the row under a row lock (``FOR UPDATE SKIP LOCKED`` on
PostgreSQL; SQLite's ``BEGIN IMMEDIATE`` serializes writers anyway) and ends one attempt per
transaction, so a racing API call or another replica's scheduler either finishes first (and the
re-check sees it) or waits for us; a row that is locked right now is simply left for the next
pass.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Final, TypeVar

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from privsep.server.db.engine import Database
from privsep.server.db.models import (
    AttemptState,
    AuditLog,
    Run,
    TaskAttempt,
    Trigger,
    TriggerState,
    WorkflowVersion,
)
from privsep.server.db.outage import unavailable
from privsep.server.runs import fail_or_retry
from privsep.server.scheduler import facts
from privsep.server.scheduler.clock import require_aware

log = logging.getLogger("privsep.server.scheduler")

DEFAULT_RUNNING_GRACE_S: Final = 60.0
"""How long past its own timeout a running attempt may go before the server ends it.

The supervisor kills the sandbox at the timeout and reports within seconds; the grace keeps
the backstop from racing that report (and absorbs clock skew between supervisor and server).
"""

_Row = TypeVar("_Row", TaskAttempt, Trigger)


def _locked(session: Session, model: type[_Row], row_id: str) -> _Row | None:
    """The row, locked for this transaction, or None if another transaction holds it."""
    return session.scalars(
        select(model).where(model.id == row_id).with_for_update(skip_locked=True)
    ).first()


def expire_deferrals(db: Database, now: datetime) -> int:
    """End deferred attempts whose deferral timeout (``next_try_at``) passed by ``now``.

    Each is failed, or put up for retry per its task's ``retries``, with "deferral timed out",
    and its trigger is cancelled. Locks are taken trigger first, then attempt: the order the
    trigger routes (event, failure) use, so the two cannot deadlock. Returns how many ended.
    """
    now = require_aware(now)
    with db.read_session() as session:
        expired = session.execute(
            select(TaskAttempt.id, TaskAttempt.trigger_id)
            .where(
                TaskAttempt.state == AttemptState.DEFERRED,
                TaskAttempt.next_try_at.is_not(None),
                TaskAttempt.next_try_at <= now,
            )
            .order_by(TaskAttempt.next_try_at)
        ).all()
    ended = 0
    for row in expired:
        try:
            ended += _expire_deferral(db, now, row.id, row.trigger_id)
        except Exception as exc:  # one bad row must not block the others
            if unavailable(exc):
                raise  # the database is away: the pass ends, and says so once
            log.exception("could not end the timed-out deferral of attempt %s", row.id)
    return ended


def _expire_deferral(db: Database, now: datetime, attempt_id: str, trigger_id: str | None) -> int:
    with db.write_session() as session:
        trigger = None
        if trigger_id is not None:
            trigger = _locked(session, Trigger, trigger_id)
            if trigger is None:
                return 0  # the trigger is being fired or failed right now: see next pass
        attempt = _locked(session, TaskAttempt, attempt_id)
        if (
            attempt is None
            or attempt.state != AttemptState.DEFERRED
            or attempt.trigger_id != trigger_id
            or attempt.next_try_at is None
            or attempt.next_try_at > now
        ):
            return 0
        deadline = attempt.next_try_at
        if trigger is not None and trigger.state in (TriggerState.QUEUED, TriggerState.RUNNING):
            trigger.state = TriggerState.CANCELLED
            trigger.finished_at = now
        fail_or_retry(session, attempt, f"deferral timed out at {deadline.isoformat()}")
        session.add(
            AuditLog(
                event="deferral_timed_out",
                subject=attempt.id,
                detail={"trigger": trigger_id, "deadline": deadline.isoformat()},
            )
        )
    log.warning("attempt %s: deferral timed out at %s", attempt_id, deadline.isoformat())
    return 1


def expire_running(
    db: Database, now: datetime, *, grace_seconds: float = DEFAULT_RUNNING_GRACE_S
) -> int:
    """Server-side backstop for task timeouts: end running attempts past timeout + grace.

    An attempt is ended (failed, or up for retry per its task) when ``started_at + timeout +
    grace_seconds <= now``, ``timeout`` being its task's in the run's pinned version; tasks
    without a timeout are never ended here. Ending it revokes its token (the attempt is no
    longer running), so the sandbox, if it still exists, can no longer act. Returns how many.
    """
    now = require_aware(now)
    grace = timedelta(seconds=grace_seconds)
    with db.read_session() as session:
        rows = session.execute(
            select(
                TaskAttempt.id,
                TaskAttempt.task_id,
                TaskAttempt.started_at,
                WorkflowVersion.id.label("version_id"),
                WorkflowVersion.content_hash,
            )
            .join(Run, Run.id == TaskAttempt.run_id)
            .join(WorkflowVersion, WorkflowVersion.id == Run.workflow_version_id)
            .where(
                TaskAttempt.state == AttemptState.RUNNING,
                TaskAttempt.started_at.is_not(None),
                TaskAttempt.started_at <= now - grace,  # every timeout is > 0
            )
        ).all()
        expired: list[tuple[str, datetime, float]] = []
        for row in rows:
            timeout = facts.cache.get(session, row.version_id, row.content_hash).timeouts.get(
                row.task_id
            )
            if row.started_at is None or timeout is None:
                continue
            if row.started_at + timedelta(seconds=timeout) + grace <= now:
                expired.append((row.id, row.started_at, timeout))
    ended = 0
    for attempt_id, started_at, timeout in expired:
        try:
            ended += _expire_running(db, attempt_id, started_at, timeout, grace_seconds)
        except Exception as exc:  # one bad row must not block the others
            if unavailable(exc):
                raise  # the database is away: the pass ends, and says so once
            log.exception("could not end timed-out attempt %s", attempt_id)
    return ended


def _expire_running(
    db: Database, attempt_id: str, started_at: datetime, timeout: float, grace_seconds: float
) -> int:
    with db.write_session() as session:
        attempt = _locked(session, TaskAttempt, attempt_id)
        # started_at must be unchanged: a deferred attempt that resumed was claimed again and
        # its clock restarted.
        if attempt is None or attempt.state != AttemptState.RUNNING:
            return 0
        if attempt.started_at != started_at:
            return 0
        owner = attempt.supervisor_id
        fail_or_retry(
            session,
            attempt,
            f"timed out: still running {timeout:g} s (the task's timeout) + {grace_seconds:g} s "
            f"after it started; ended by the server because its supervisor did not report",
        )
        session.add(
            AuditLog(
                event="attempt_timed_out",
                subject=attempt.id,
                detail={"supervisor": owner, "timeout": timeout},
            )
        )
    log.warning("attempt %s exceeded its %g s timeout; ended by the server", attempt_id, timeout)
    return 1


def next_deferral_deadline(session: Session) -> datetime | None:
    """The earliest deferral timeout still pending, so the scheduler can wake for it."""
    return session.scalar(
        select(func.min(TaskAttempt.next_try_at)).where(
            TaskAttempt.state == AttemptState.DEFERRED, TaskAttempt.next_try_at.is_not(None)
        )
    )
