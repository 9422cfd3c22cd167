"""The scheduler: runs from schedules, deferral and running timeouts, concurrency admission.

Everything here is a pass over the database that is safe to run on several server replicas at
once, and every function takes the current time (``now``, an aware UTC datetime) as an argument
instead of reading a clock, so a test can walk a schedule tick by tick without sleeping. Only
:class:`SchedulerThread` reads a clock, and even that one is injectable.

What this module does *not* do, because it already happens elsewhere and must stay there:

* Dependency resolution (queue downstream, skip after a failure, end the run) happens in
  :mod:`privsep.server.runs`, inside the transaction that ends an attempt, so a finished
  upstream makes its downstream runnable at once, on whichever replica handled the call.
* Lost supervisors are taken back by :mod:`privsep.server.reaper`.

Scheduled runs
    A workflow's current version may carry ``schedule``: a cron string (evaluated in UTC; five
    fields, or six with seconds), a preset (``@hourly``, ``@daily``/``@midnight``, ``@weekly``,
    ``@monthly``, ``@yearly``/``@annually``) or a number of seconds (a fixed interval). A *tick*
    is a point in time the schedule names; the run for a tick is created once the clock has
    reached it (at or after the tick, never before) and carries the tick as ``logical_date``.

    Ticks are counted from the ``logical_date`` of the workflow's latest scheduled run, or from
    the workflow's ``created_at`` for the first one; a tick exactly at that base does not count
    (it is the base). Interval schedules stay anchored to that base (base + k x interval), so
    they do not drift by the scheduler's own latency.

    **No catch-up.** When several ticks were missed (the scheduler was down, the workflow was
    deactivated for a while), only the latest missed tick gets a run. A day of downtime on a
    minutely schedule must not come back as 1,440 runs that queue ahead of everything else;
    if someone needs the intermediate runs, triggering them by hand is explicit. The price is
    that a reactivated workflow fires once at once, for its latest missed tick.

    **Replicas.** Two schedulers that see the same tick both try to insert the run; the unique
    ``(workflow_id, logical_date)`` constraint lets exactly one succeed, and the other's insert
    fails inside a SAVEPOINT and is counted as "someone else made it". Each run is created in
    its own short transaction, so one workflow's trouble never holds up another's, and on
    SQLite the write lock is held for one insert at a time. Ticks are judged by the clock of
    whichever replica gets there first: keep replica clocks in sync (NTP).

Timeouts
    * A deferred attempt whose ``next_try_at`` (set from the defer call's timeout) has passed
      fails, or is retried per its task's ``retries``, with "deferral timed out"; its trigger is
      cancelled so a late event cannot resume it.
    * The supervisor's sandbox enforces a task's wall-clock ``timeout``. As a backstop for a
      supervisor that keeps heartbeating but never reports (a bug, a wedged executor), a running
      attempt whose ``started_at + timeout + grace`` has passed is failed or retried here.

    Each of those writes re-checks the row under a row lock (``FOR UPDATE SKIP LOCKED`` on
    PostgreSQL; SQLite's ``BEGIN IMMEDIATE`` serializes writers anyway) and ends one attempt
    per transaction, so a racing API call or another replica's scheduler either finishes first
    (and the re-check sees it) or waits for us; a row that is locked right now is simply left
    for the next pass.

Concurrency
    :func:`claim_candidates` is the claim route's candidate query with a per-workflow and a
    global limit on running attempts built in; :func:`admit` cuts an existing candidate list
    down to what the limits allow. Both count in the claim's own transaction after serializing
    claims, so the limits hold across replicas (see the comment above them for the details).
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Final, Protocol, TypeVar, cast

from croniter import croniter  # type: ignore[import-untyped]
from sqlalchemy import Integer, Subquery, Table, bindparam, func, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from privsep.server.db.engine import Database
from privsep.server.db.models import (
    AttemptState,
    AuditLog,
    Run,
    RunTriggerKind,
    TaskAttempt,
    Trigger,
    TriggerState,
    Workflow,
    WorkflowVersion,
    version_digest,
)
from privsep.server.runs import fail_or_retry, start_run
from privsep.server.schemas import WorkflowDefinition

log = logging.getLogger("privsep.server.scheduler")

DEFAULT_RUNNING_GRACE_S: Final = 60.0
"""How long past its own timeout a running attempt may go before the server ends it.

The supervisor kills the sandbox at the timeout and reports within seconds; the grace keeps
the backstop from racing that report (and absorbs clock skew between supervisor and server).
"""

CLAIM_LOCK_KEY: Final = 0x7072_6976_7365_7031  # b"privsep1": fits a signed 64-bit key
"""The PostgreSQL advisory lock that serializes claim transactions while limits are on."""

PRESETS: Final[Mapping[str, str]] = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
"""The presets we accept, mapped here rather than left to croniter so that the accepted set
does not change with the installed croniter version."""

_MIN_WAIT_S: Final = 0.05
_Row = TypeVar("_Row", TaskAttempt, Trigger)
_FACTS_CACHE_SIZE: Final = 2048


def _require_aware(now: datetime) -> datetime:
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError(f"naive datetime {now!r}: the scheduler works in aware UTC only")
    return now.astimezone(UTC)


# --- schedules --------------------------------------------------------------------------------


class InvalidSchedule(ValueError):
    """A workflow's ``schedule`` value that names no sequence of ticks."""


class Schedule(Protocol):
    """A sequence of ticks in UTC."""

    def next_after(self, moment: datetime) -> datetime:
        """The first tick strictly after ``moment``."""
        ...

    def latest_between(self, after: datetime, now: datetime) -> datetime | None:
        """The latest tick ``t`` with ``after < t <= now``, or None if there is none."""
        ...


@dataclass(frozen=True)
class CronSchedule:
    """A cron expression (presets already expanded), evaluated in UTC."""

    expression: str

    def next_after(self, moment: datetime) -> datetime:
        return cast(datetime, croniter(self.expression, moment).get_next(datetime))

    def latest_between(self, after: datetime, now: datetime) -> datetime | None:
        if self.next_after(after) > now:
            return None
        # croniter's get_prev is strictly before its start, so ``now`` itself, if it is a tick,
        # is the next tick after that one; no epsilon arithmetic needed.
        previous = cast(datetime, croniter(self.expression, now).get_prev(datetime))
        following = self.next_after(previous)
        return following if following <= now else previous


@dataclass(frozen=True)
class IntervalSchedule:
    """Every ``seconds`` seconds, counted from the base it is asked about.

    The arithmetic is in whole microseconds (the database's resolution), so a tick is never
    missed or doubled by floating-point rounding at a boundary.
    """

    seconds: float

    @property
    def _step_us(self) -> int:
        return max(1, round(self.seconds * 1_000_000))

    def next_after(self, moment: datetime) -> datetime:
        return moment + timedelta(microseconds=self._step_us)

    def latest_between(self, after: datetime, now: datetime) -> datetime | None:
        elapsed_us = (now - after) // timedelta(microseconds=1)
        steps = elapsed_us // self._step_us
        if steps < 1:
            return None
        return after + timedelta(microseconds=steps * self._step_us)


def parse_schedule(value: str | float | None) -> Schedule | None:
    """The :class:`Schedule` a definition's ``schedule`` names; None if it has none.

    Raises :class:`InvalidSchedule` for a value that is not a valid cron string, a known
    preset, or a positive finite number of seconds.
    """
    if value is None:
        return None
    if isinstance(value, bool):
        raise InvalidSchedule(f"schedule {value!r} is neither a cron string nor seconds")
    if isinstance(value, int | float):
        seconds = float(value)
        if not math.isfinite(seconds) or seconds <= 0:
            raise InvalidSchedule(
                f"interval schedule must be a positive number of seconds, not {value!r}"
            )
        return IntervalSchedule(seconds)
    text = " ".join(value.split())
    if text.startswith("@"):
        expanded = PRESETS.get(text.lower())
        if expanded is None:
            known = ", ".join(PRESETS)
            raise InvalidSchedule(f"unknown schedule preset {value!r}; known presets: {known}")
        return CronSchedule(expanded)
    if not text or not croniter.is_valid(text):
        raise InvalidSchedule(f"schedule {value!r} is not a valid cron expression")
    return CronSchedule(text)


# --- what a workflow version says, cached by content hash ---------------------------------------


@dataclass(frozen=True)
class _VersionFacts:
    """What the scheduler needs from one workflow version's definition."""

    schedule: Schedule | None
    schedule_error: str | None
    timeouts: Mapping[str, float | None]


class _FactsCache:
    """Version facts keyed by ``content_hash``.

    Each pass looks at every active workflow's schedule and every long-running attempt's
    timeout; loading and parsing a definition (up to 10,000 tasks of JSON) for each of them on
    every pass would dominate the pass. The content hash is recomputed from the row's
    definition text and source URI (:func:`~privsep.server.db.models.version_digest`, as the
    parse route made it), so an entry can never describe a different definition; a row whose
    hash does not match (hand-made) is parsed every time but never cached.
    """

    def __init__(self, size: int = _FACTS_CACHE_SIZE) -> None:
        self._size = size
        self._entries: dict[str, _VersionFacts] = {}
        self._lock = threading.Lock()

    def get(self, session: Session, version_id: int, content_hash: str) -> _VersionFacts:
        with self._lock:
            found = self._entries.get(content_hash)
        if found is not None:
            return found
        row = session.execute(
            select(WorkflowVersion.definition, WorkflowVersion.source_uri).where(
                WorkflowVersion.id == version_id
            )
        ).first()
        text = None if row is None else row.definition
        facts = self._parse(version_id, text or "")
        if row is not None and version_digest(row.definition, row.source_uri) == content_hash:
            with self._lock:
                if len(self._entries) >= self._size:
                    self._entries.pop(next(iter(self._entries)))
                self._entries[content_hash] = facts
        return facts

    @staticmethod
    def _parse(version_id: int, text: str) -> _VersionFacts:
        try:
            definition = WorkflowDefinition.model_validate(json.loads(text), strict=False)
        except ValueError as exc:
            log.warning("workflow version %d has an unreadable definition: %s", version_id, exc)
            return _VersionFacts(None, f"unreadable definition: {exc}", {})
        timeouts = {task.task_id: task.timeout for task in definition.tasks}
        try:
            schedule = parse_schedule(definition.schedule)
        except InvalidSchedule as exc:
            log.warning(
                "workflow %s (version %d) will not be scheduled: %s",
                definition.workflow_id,
                version_id,
                exc,
            )
            return _VersionFacts(None, str(exc), timeouts)
        return _VersionFacts(schedule, None, timeouts)

    def __contains__(self, content_hash: str) -> bool:
        with self._lock:
            return content_hash in self._entries

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


_facts = _FactsCache()


# --- scheduled runs ---------------------------------------------------------------------------


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


def _plan(session: Session, now: datetime) -> _Plan:
    now = _require_aware(now)
    latest = (
        select(func.max(Run.logical_date))
        .where(
            Run.workflow_id == Workflow.id,
            Run.trigger_kind == RunTriggerKind.SCHEDULE,
            Run.logical_date.is_not(None),
        )
        .correlate(Workflow)
        .scalar_subquery()
    )
    rows = session.execute(
        select(
            Workflow.id,
            Workflow.created_at,
            WorkflowVersion.id,
            WorkflowVersion.content_hash,
            latest,
        )
        .join(WorkflowVersion, WorkflowVersion.id == Workflow.current_version_id)
        .where(Workflow.active.is_(True))
        .order_by(Workflow.id)
    ).all()
    due: list[DueRun] = []
    next_tick: datetime | None = None
    for workflow_id, created_at, version_id, content_hash, last in rows:
        schedule = _facts.get(session, version_id, content_hash).schedule
        if schedule is None:
            continue
        base: datetime = last if last is not None else created_at
        tick = schedule.latest_between(base, now)
        if tick is not None:
            first = schedule.next_after(base)
            due.append(DueRun(workflow_id, version_id, tick, skipped_ticks=first != tick))
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
        last = session.scalar(
            select(func.max(Run.logical_date)).where(
                Run.workflow_id == due.workflow_id,
                Run.trigger_kind == RunTriggerKind.SCHEDULE,
                Run.logical_date.is_not(None),
            )
        )
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


def _create(db: Database, now: datetime) -> tuple[int, datetime | None]:
    with db.read_session() as session:
        plan = _plan(session, now)
    created = 0
    for due in plan.due:
        try:
            if create_scheduled_run(db, due) is not None:
                created += 1
        except Exception:
            # One workflow's failure (say, a deadlock victim) must not starve the others; the
            # tick is still due on the next pass.
            log.exception("could not create the scheduled run of %s", due.workflow_id)
    return created, plan.next_tick


def create_scheduled_runs(db: Database, now: datetime) -> int:
    """One pass: create (and start) every run the schedules ask for at ``now``.

    Returns how many runs *this* call created; runs another replica created count there.
    """
    return _create(db, now)[0]


# --- timeouts ---------------------------------------------------------------------------------


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
    now = _require_aware(now)
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
    for attempt_id, trigger_id in expired:
        try:
            ended += _expire_deferral(db, now, attempt_id, trigger_id)
        except Exception:  # one bad row must not block the others
            log.exception("could not end the timed-out deferral of attempt %s", attempt_id)
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
    now = _require_aware(now)
    grace = timedelta(seconds=grace_seconds)
    with db.read_session() as session:
        rows = session.execute(
            select(
                TaskAttempt.id,
                TaskAttempt.task_id,
                TaskAttempt.started_at,
                WorkflowVersion.id,
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
        for attempt_id, task_id, started_at, version_id, content_hash in rows:
            timeout = _facts.get(session, version_id, content_hash).timeouts.get(task_id)
            if started_at is None or timeout is None:
                continue
            if started_at + timedelta(seconds=timeout) + grace <= now:
                expired.append((attempt_id, started_at, timeout))
    ended = 0
    for attempt_id, started_at, timeout in expired:
        try:
            ended += _expire_running(db, attempt_id, started_at, timeout, grace_seconds)
        except Exception:  # one bad row must not block the others
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


# --- concurrency ------------------------------------------------------------------------------
#
# Both functions below count RUNNING attempts (deferred ones hold no sandbox and do not count)
# in the claim's own transaction, after serializing claims, so their counts cannot go stale
# before the claim's conditional UPDATEs commit:
#
# * SQLite: write transactions are ``BEGIN IMMEDIATE``, so claims are already serialized.
# * PostgreSQL: they take the transaction-scoped advisory lock CLAIM_LOCK_KEY first (only when
#   a limit is set), and under READ COMMITTED each later statement sees everything the previous
#   holder committed before releasing it. This relies on READ COMMITTED, the server's default;
#   under REPEATABLE READ the counts would come from the transaction's first snapshot.
#
# So limits are exact on both backends as long as every claim goes through one of these
# functions. The price on PostgreSQL is that claims (one short transaction each) run one at a
# time across replicas while a limit is configured; without limits nothing is locked.


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


def claim_candidates(
    session: Session,
    now: datetime,
    want: int,
    *,
    per_workflow: int | None = None,
    global_limit: int | None = None,
) -> list[str]:
    """The queued, due attempts (ids, oldest first) a claim of ``want`` items should take.

    This is the claim route's candidate query with the concurrency limits built in. With no
    limit it is exactly the route's current query (``want x 4`` candidates, for lost races).
    With limits it serializes claims (see above) and returns at most ``want`` ids that all fit:
    at most ``global_limit - running`` in total, and per workflow at most ``per_workflow -
    running in that workflow``, its oldest first. Selecting per workflow in SQL (a window
    function) matters: a busy workflow's backlog can never fill the candidate window and starve
    other workflows that still have room, as filtering an "oldest N" list afterwards would.
    """
    now = _require_aware(now)
    if want <= 0:
        return []
    if not _check_limits(per_workflow, global_limit):
        return list(session.scalars(_READY_OLDEST, {"b_now": now, "b_limit": want * 4}))
    ready = (
        TaskAttempt.state == AttemptState.QUEUED,
        or_(TaskAttempt.next_try_at.is_(None), TaskAttempt.next_try_at <= now),
    )
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
    back unchanged and nothing is locked. Never exceeds a limit (see the guarantees above);
    it can undershoot when the candidate list holds too few admissible attempts, which is what
    :func:`claim_candidates` avoids.
    """
    unique = list(dict.fromkeys(candidates))
    if not unique or not _check_limits(per_workflow, global_limit):
        return unique
    _serialize_claims(session)
    workflow_of: dict[str, str] = {
        attempt_id: workflow_id
        for attempt_id, workflow_id in session.execute(
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
            workflow_id: int(n)
            for workflow_id, n in session.execute(
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


# --- the pass and the thread ------------------------------------------------------------------


@dataclass(frozen=True)
class PassResult:
    """What one scheduler pass did, and when the next one is worth running."""

    runs_created: int = 0
    deferrals_expired: int = 0
    running_expired: int = 0
    next_wakeup: datetime | None = None
    errors: tuple[str, ...] = field(default_factory=tuple)


def _earliest(moments: Iterable[datetime | None]) -> datetime | None:
    present = [m for m in moments if m is not None]
    return min(present) if present else None


def scheduler_pass(
    db: Database, now: datetime, *, running_grace: float = DEFAULT_RUNNING_GRACE_S
) -> PassResult:
    """Run every part of the scheduler once at ``now``. Never raises.

    Each part runs on its own, so a failure in one (reported in ``errors`` and logged) does
    not keep the others from running.
    """
    now = _require_aware(now)
    errors: list[str] = []
    created = deferrals = running = 0
    next_tick: datetime | None = None
    deadline: datetime | None = None
    try:
        created, next_tick = _create(db, now)
    except Exception as exc:
        log.exception("scheduling runs failed")
        errors.append(f"schedule: {exc.__class__.__name__}")
    try:
        deferrals = expire_deferrals(db, now)
        with db.read_session() as session:
            deadline = next_deferral_deadline(session)
    except Exception as exc:
        log.exception("expiring deferrals failed")
        errors.append(f"deferrals: {exc.__class__.__name__}")
    try:
        running = expire_running(db, now, grace_seconds=running_grace)
    except Exception as exc:
        log.exception("expiring running attempts failed")
        errors.append(f"running: {exc.__class__.__name__}")
    return PassResult(created, deferrals, running, _earliest([next_tick, deadline]), tuple(errors))


class SchedulerThread(threading.Thread):
    """Runs :func:`scheduler_pass` now, then again every ``interval`` seconds until stopped.

    It sleeps less than ``interval`` when a schedule tick or a deferral timeout comes sooner,
    so a cron workflow fires within milliseconds of its tick rather than up to ``interval``
    late. :meth:`wake` runs a pass at once (say, after a new version of a workflow arrives).
    It never dies: any exception in a pass is logged and the next pass runs as planned.

    ``clock`` returns seconds since the epoch, like :func:`time.time`; tests pass a fake one.
    """

    def __init__(
        self,
        db: Database,
        interval: float,
        clock: Callable[[], float] = time.time,
        *,
        running_grace: float = DEFAULT_RUNNING_GRACE_S,
    ) -> None:
        super().__init__(name="privsep-scheduler", daemon=True)
        if interval <= 0:
            raise ValueError("the scheduler interval must be positive")
        self.db = db
        self.interval = interval
        self.clock = clock
        self.running_grace = running_grace
        self.last_result: PassResult | None = None
        self._passes = 0
        self._done = threading.Condition()
        self._wake = threading.Event()
        self._stopping = False

    @property
    def passes(self) -> int:
        """How many passes have completed (successfully or not)."""
        with self._done:
            return self._passes

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.clock(), UTC)

    def run(self) -> None:
        while not self._stopping:
            self._wake.clear()
            wait = self.interval
            try:
                now = self.now()
                result = scheduler_pass(self.db, now, running_grace=self.running_grace)
                self.last_result = result
                if result.next_wakeup is not None:
                    until = (result.next_wakeup - now).total_seconds()
                    wait = min(self.interval, max(_MIN_WAIT_S, until))
            except Exception:  # nothing may kill the thread; the next pass tries again
                log.exception("scheduler pass failed; trying again in %.1f s", self.interval)
            with self._done:
                self._passes += 1
                self._done.notify_all()
            if self._stopping:
                break
            self._wake.wait(wait)

    def wake(self) -> None:
        """Run a pass as soon as the current one (if any) ends."""
        self._wake.set()

    def wait_for_passes(self, count: int, timeout: float) -> bool:
        """Block until at least ``count`` passes have completed; False on timeout."""
        with self._done:
            return self._done.wait_for(lambda: self._passes >= count, timeout)

    def stop(self, timeout: float | None = None) -> None:
        """Stop after the current pass; joins the thread if ``timeout`` is given."""
        self._stopping = True
        self._wake.set()
        if timeout is not None and self.is_alive():
            self.join(timeout)
