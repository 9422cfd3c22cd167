"""Runs from schedules: which ticks are due, and creating each tick's run exactly once.

This module changes when the rules for turning ticks into runs change (the base ticks are
counted from, catch-up, the race between replicas); what a schedule string means is
:mod:`.schedules`' concern.

A *tick* is a point in time the schedule names; the run for a tick is created once the clock
has reached it (at or after the tick, never before) and carries the tick as ``logical_date``.

Ticks are counted from the ``logical_date`` of the workflow's latest scheduled run, or from the
workflow's ``created_at`` for the first one; a tick exactly at that base does not count (it is
the base). Interval schedules stay anchored to that base (base + k x interval), so they do not
drift by the scheduler's own latency.

**No catch-up.** When several ticks were missed (the scheduler was down, the workflow was
deactivated for a while), only the latest missed tick gets a run. A day of downtime on a
minutely schedule must not come back as 1,440 runs that queue ahead of everything else; if
someone needs the intermediate runs, triggering them by hand is explicit. The price is that a
reactivated workflow fires once at once, for its latest missed tick.

**Replicas.** Two schedulers that see the same tick both try to insert the run; the unique
``(workflow_id, logical_date)`` constraint lets exactly one succeed, and the other's insert
fails inside a SAVEPOINT and is counted as "someone else made it". Each run is created in its
own short transaction, so one workflow's trouble never holds up another's, and on SQLite the
write lock is held for one insert at a time. Ticks are judged by the clock of whichever replica
gets there first: keep replica clocks in sync (NTP).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Select, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Mapped, Session

from privsep.server.db.engine import Database
from privsep.server.db.models import Run, RunTriggerKind, Workflow, WorkflowVersion
from privsep.server.db.outage import unavailable
from privsep.server.runs import start_run
from privsep.server.scheduler import facts
from privsep.server.scheduler.clock import require_aware

log = logging.getLogger("privsep.server.scheduler")


@dataclass(frozen=True)
class DueRun:
    """A run the schedule asks for: one tick of one workflow, pinned to one version.

    ``skipped_ticks`` says whether earlier missed ticks were passed over (no catch-up).
    """

    workflow_id: str
    version_id: int
    logical_date: datetime
    skipped_ticks: bool = False


@dataclass(frozen=True)
class _Plan:
    due: list[DueRun]
    next_tick: datetime | None


def _latest_scheduled(workflow_id: Mapped[str] | str) -> Select[datetime | None]:
    """The ``logical_date`` of a workflow's latest scheduled run: the base ticks count from.

    The plan reads it for every workflow at once (``workflow_id`` a correlated column) and the
    creation re-checks it for one (a plain id); both must mean the same base, or a re-check
    could let through a tick the plan would never have chosen.
    """
    return select(func.max(Run.logical_date)).where(
        Run.workflow_id == workflow_id,
        Run.trigger_kind == RunTriggerKind.SCHEDULE,
        Run.logical_date.is_not(None),
    )


def _plan(session: Session, now: datetime) -> _Plan:
    now = require_aware(now)
    latest = _latest_scheduled(Workflow.id).correlate(Workflow).scalar_subquery()
    rows = session.execute(
        select(
            Workflow.id.label("workflow_id"),
            Workflow.created_at,
            WorkflowVersion.id.label("version_id"),
            WorkflowVersion.content_hash,
            latest.label("last"),
        )
        .join(WorkflowVersion, WorkflowVersion.id == Workflow.current_version_id)
        .where(Workflow.active.is_(True))
        .order_by(Workflow.id)
    ).all()
    due: list[DueRun] = []
    next_tick: datetime | None = None
    for row in rows:
        schedule = facts.cache.get(session, row.version_id, row.content_hash).schedule
        if schedule is None:
            continue
        base: datetime = row.last if row.last is not None else row.created_at
        tick = schedule.latest_between(base, now)
        if tick is not None:
            first = schedule.next_after(base)
            due.append(DueRun(row.workflow_id, row.version_id, tick, skipped_ticks=first != tick))
        upcoming = schedule.next_after(max(base, now))
        next_tick = upcoming if next_tick is None else min(next_tick, upcoming)
    return _Plan(due, next_tick)


def due_runs(session: Session, now: datetime) -> list[DueRun]:
    """The runs schedules ask for at ``now``: at most one per active scheduled workflow.

    Read-only; pair with :func:`create_scheduled_run`, or call :func:`create_scheduled_runs`.
    """
    return _plan(session, now).due


def create_scheduled_run(db: Database, due: DueRun) -> str | None:
    """Create and start the run for ``due`` in its own transaction; its id, or None.

    None means nothing was created, and that is not an error: another replica made the run
    first (seen by the re-check or by the unique constraint), or the workflow was deactivated
    or got a new version since ``due`` was computed (the next pass plans again from the new
    state). The re-check of the latest scheduled ``logical_date`` also keeps a slow replica
    holding an old plan from adding an older tick after a newer one.
    """
    with db.write_session() as session:
        workflow = session.get(Workflow, due.workflow_id)
        if workflow is None or not workflow.active or workflow.current_version_id != due.version_id:
            return None
        last = session.scalar(_latest_scheduled(due.workflow_id))
        if last is not None and last >= due.logical_date:
            return None
        run = Run(
            workflow_id=due.workflow_id,
            workflow_version_id=due.version_id,
            trigger_kind=RunTriggerKind.SCHEDULE,
            logical_date=due.logical_date,
            conf={},
        )
        try:
            # A SAVEPOINT, so losing the race leaves the transaction usable and the loss is
            # told apart from any other error.
            with session.begin_nested():
                session.add(run)
                session.flush()
        except IntegrityError:
            log.debug(
                "run of %s for %s already exists (another replica)",
                due.workflow_id,
                due.logical_date.isoformat(),
            )
            return None
        start_run(session, run)
        run_id = run.id
    if due.skipped_ticks:
        log.info(
            "scheduled run %s of %s for %s; earlier missed ticks were skipped (no catch-up)",
            run_id,
            due.workflow_id,
            due.logical_date.isoformat(),
        )
    else:
        log.info(
            "scheduled run %s of %s for %s", run_id, due.workflow_id, due.logical_date.isoformat()
        )
    return run_id


def create_due_runs(db: Database, now: datetime) -> tuple[int, datetime | None]:
    """Create every run due at ``now``; how many this call created, and the next tick.

    The next tick (None without scheduled workflows) is what lets the scheduler thread sleep
    until exactly then instead of a whole interval.
    """
    with db.read_session() as session:
        plan = _plan(session, now)
    created = 0
    for due in plan.due:
        try:
            if create_scheduled_run(db, due) is not None:
                created += 1
        except Exception as exc:
            if unavailable(exc):
                raise  # the database is away: the pass ends, and says so once
            # One workflow's failure (say, a deadlock victim) must not starve the others; the
            # tick is still due on the next pass.
            log.exception("could not create the scheduled run of %s", due.workflow_id)
    return created, plan.next_tick


def create_scheduled_runs(db: Database, now: datetime) -> int:
    """One pass: create (and start) every run the schedules ask for at ``now``.

    Returns how many runs *this* call created; runs another replica created count there.
    """
    created, _next_tick = create_due_runs(db, now)
    return created
