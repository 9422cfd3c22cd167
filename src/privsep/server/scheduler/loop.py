"""When the scheduler's parts run: one pass over all of them, and the thread that repeats it.

This module changes when the cadence changes (how long to sleep, what wakes a pass early, how
failures are contained); what each part does lives in its own module. Only
:class:`SchedulerThread` reads a clock, and even that one is injectable.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Final

from privsep.server.db.engine import Database
from privsep.server.db.outage import pass_failed
from privsep.server.metrics import SCHEDULER_PASS_SECONDS
from privsep.server.scheduler.clock import require_aware
from privsep.server.scheduler.log_retention import LogRetention, prune_logs
from privsep.server.scheduler.repair import repair_open_runs
from privsep.server.scheduler.scheduled_runs import create_due_runs
from privsep.server.scheduler.timeouts import (
    DEFAULT_RUNNING_GRACE_S,
    expire_deferrals,
    expire_running,
    next_deferral_deadline,
)

log = logging.getLogger("privsep.server.scheduler")

_MIN_WAIT_S: Final = 0.05


@dataclass(frozen=True)
class PassResult:
    """What one scheduler pass did, and when the next one is worth running."""

    runs_created: int = 0
    deferrals_expired: int = 0
    running_expired: int = 0
    next_wakeup: datetime | None = None
    errors: tuple[str, ...] = field(default_factory=tuple)
    runs_repaired: int = 0
    logs_pruned: int = 0


def _earliest(moments: Iterable[datetime | None]) -> datetime | None:
    present = [m for m in moments if m is not None]
    return min(present) if present else None


def scheduler_pass(
    db: Database,
    now: datetime,
    *,
    running_grace: float = DEFAULT_RUNNING_GRACE_S,
    log_retention: LogRetention | None = None,
) -> PassResult:
    """Run every part of the scheduler once at ``now``. Never raises.

    Each part runs on its own, so a failure in one (reported in ``errors`` and logged) does
    not keep the others from running; except a database outage, which ends the pass (and is
    logged once per incident, not once per pass: :mod:`privsep.server.db.outage`).
    """
    now = require_aware(now)
    errors: list[str] = []
    created = deferrals = running = repaired = pruned = 0
    next_tick: datetime | None = None
    deadline: datetime | None = None
    try:
        created, next_tick = create_due_runs(db, now)
    except Exception as exc:
        pass_failed(log, db.incidents, exc, "scheduling runs")
        errors.append(f"schedule: {exc.__class__.__name__}")
    if errors and db.incidents.active:
        # The database is away: the other parts would only fail the same way.
        return PassResult(errors=tuple(errors))
    try:
        deferrals = expire_deferrals(db, now)
        with db.read_session() as session:
            deadline = next_deferral_deadline(session)
    except Exception as exc:
        pass_failed(log, db.incidents, exc, "expiring deferrals")
        errors.append(f"deferrals: {exc.__class__.__name__}")
    try:
        running = expire_running(db, now, grace_seconds=running_grace)
    except Exception as exc:
        pass_failed(log, db.incidents, exc, "expiring running attempts")
        errors.append(f"running: {exc.__class__.__name__}")
    try:
        repaired = repair_open_runs(db)
    except Exception as exc:
        pass_failed(log, db.incidents, exc, "repairing open runs")
        errors.append(f"repair: {exc.__class__.__name__}")
    if log_retention is not None:
        try:
            pruned = prune_logs(db, now, log_retention)
        except Exception as exc:
            pass_failed(log, db.incidents, exc, "pruning central logs")
            errors.append(f"logs: {exc.__class__.__name__}")
    return PassResult(
        created,
        deferrals,
        running,
        _earliest([next_tick, deadline]),
        tuple(errors),
        runs_repaired=repaired,
        logs_pruned=pruned,
    )


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
        log_retention: LogRetention | None = None,
    ) -> None:
        super().__init__(name="privsep-scheduler", daemon=True)
        if interval <= 0:
            raise ValueError("the scheduler interval must be positive")
        self.db = db
        self.interval = interval
        self.clock = clock
        self.running_grace = running_grace
        self.log_retention = log_retention
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
                with SCHEDULER_PASS_SECONDS.time():
                    result = scheduler_pass(
                        self.db,
                        now,
                        running_grace=self.running_grace,
                        log_retention=self.log_retention,
                    )
                self.last_result = result
                if result.next_wakeup is not None:
                    until = (result.next_wakeup - now).total_seconds()
                    wait = min(self.interval, max(_MIN_WAIT_S, until))
            except Exception as exc:  # nothing may kill the thread; the next pass tries again
                pass_failed(log, self.db.incidents, exc, "the scheduler pass")
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
