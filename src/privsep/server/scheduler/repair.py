"""A backstop for runs left open: every attempt has ended, yet the run still says ``running``.

Runs close in the transaction that ends their last attempt (:mod:`privsep.server.runs`), under
the run's row lock, so this should find nothing. It exists because a run that never closes
costs a lot (``runs trigger --wait`` hangs on it, its concurrency slot stays taken) and
nothing else would ever look at it again: whatever left it open (a bug, a manual edit of the
database, a server older than the lock), the next pass closes it with the state its attempts
say, or queues the tasks that nobody queued, and records that once, in the audit log and as
one warning.

Each run is settled in a transaction of its own, under its row lock and after checking again
that it is still running with nothing unfinished, so a racing attempt's end, or another
replica's pass, either finishes first (and the check sees it) or waits for this one.
"""

from __future__ import annotations

import logging
from typing import Final

from sqlalchemy import exists, select

from privsep.server.db.engine import Database
from privsep.server.db.models import AuditLog, Run, RunState, TaskAttempt
from privsep.server.runs import UNFINISHED, repair_run

log = logging.getLogger("privsep.server.scheduler")

# A pass looks at this many open runs at most; the next pass takes the rest.
REPAIR_BATCH: Final = 100

_LEFT_OPEN = (
    select(Run.id)
    .where(
        Run.state == RunState.RUNNING,
        ~exists().where(TaskAttempt.run_id == Run.id, TaskAttempt.state.in_(UNFINISHED)),
    )
    .order_by(Run.created_at)
    .limit(REPAIR_BATCH)
)


def repair_open_runs(db: Database) -> int:
    """Settle every run that is running with no attempt left unfinished; how many it changed."""
    with db.read_session() as session:
        candidates = list(session.scalars(_LEFT_OPEN))
    repaired = 0
    for run_id in candidates:
        with db.write_session() as session:
            done = repair_run(session, run_id)
            if not done:
                continue
            detail = {"closed": str(done.closed) if done.closed else None, "queued": done.queued}
            session.add(AuditLog(event="run_repaired", subject=run_id, detail=detail))
        repaired += 1
        if done.closed is not None:
            log.warning(
                "run %s was left running after all its attempts ended: closed it as %s",
                run_id,
                done.closed,
            )
        else:
            log.warning(
                "run %s had %d tasks due that nobody queued: queued them", run_id, done.queued
            )
    return repaired
