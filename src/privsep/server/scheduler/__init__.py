"""The scheduler: runs from schedules, deferral and running timeouts, concurrency admission.

Everything here is a pass over the database that is safe to run on several server replicas at
once, and every function takes the current time (``now``, an aware UTC datetime) as an argument
instead of reading a clock, so a test can walk a schedule tick by tick without sleeping. Only
:class:`SchedulerThread` reads a clock, and even that one is injectable.

One module per reason to change:

* :mod:`.schedules`: what a ``schedule`` value means (cron, presets, intervals).
* :mod:`.facts`: what a workflow version's definition says, parsed once per content hash.
* :mod:`.scheduled_runs`: which ticks are due, and creating each tick's run exactly once.
* :mod:`.timeouts`: expired deferrals, and the server's backstop for running attempts.
* :mod:`.admission`: which queued attempts a claim may start under the running limits.
* :mod:`.log_retention`: deleting central logs by age and by a byte budget.
* :mod:`.loop`: one pass over all of the above, and the thread that repeats it.

What this package does *not* do, because it already happens elsewhere and must stay there:

* Dependency resolution (queue downstream, skip after a failure, end the run) happens in
  :mod:`privsep.server.runs`, inside the transaction that ends an attempt, so a finished
  upstream makes its downstream runnable at once, on whichever replica handled the call.
* Lost supervisors are taken back by :mod:`privsep.server.reaper`.

The names below are the package's surface; callers import them from here, so the modules can
move without their callers noticing.
"""

from __future__ import annotations

from privsep.server.scheduler.admission import CLAIM_LOCK_KEY, admit, claim_candidates
from privsep.server.scheduler.log_retention import LogRetention, prune_logs
from privsep.server.scheduler.loop import PassResult, SchedulerThread, scheduler_pass
from privsep.server.scheduler.scheduled_runs import (
    DueRun,
    create_scheduled_run,
    create_scheduled_runs,
    due_runs,
)
from privsep.server.scheduler.schedules import (
    PRESETS,
    CronSchedule,
    IntervalSchedule,
    InvalidSchedule,
    Schedule,
    parse_schedule,
)
from privsep.server.scheduler.timeouts import (
    DEFAULT_RUNNING_GRACE_S,
    expire_deferrals,
    expire_running,
    next_deferral_deadline,
)

__all__ = [
    "CLAIM_LOCK_KEY",
    "DEFAULT_RUNNING_GRACE_S",
    "PRESETS",
    "CronSchedule",
    "DueRun",
    "IntervalSchedule",
    "InvalidSchedule",
    "LogRetention",
    "PassResult",
    "Schedule",
    "SchedulerThread",
    "admit",
    "claim_candidates",
    "create_scheduled_run",
    "create_scheduled_runs",
    "due_runs",
    "expire_deferrals",
    "expire_running",
    "next_deferral_deadline",
    "parse_schedule",
    "prune_logs",
    "scheduler_pass",
]
