"""Reconciliation: the server's view of what a supervisor runs follows the supervisor's own.

A supervisor's heartbeat lists the work it really holds. The server keeps those attempts alive
and takes back, as lost, whatever it thinks that supervisor holds but the list leaves out,
once the claim is older than a grace period. That closes the gap a lost claim answer opens: a
replica that committed a claim and died before replying (or a claim that outlived the client's
timeout) leaves an attempt "running" under a live supervisor that never heard of it, and no
heartbeat timeout would ever end it, since the supervisor keeps heartbeating.

The grace period covers a claim whose answer is still on its way when the heartbeat is written;
the supervisor sends both from one loop, so in practice it only has to outlast clock skew
between replicas. Every write is conditional on "still running under this supervisor", as the
reaper's are, so replicas can reconcile at once without double-counting a try.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from privsep.server.db.models import (
    AttemptState,
    AuditLog,
    ParseJob,
    ParseJobState,
    TaskAttempt,
    Trigger,
    TriggerState,
)
from privsep.server.routes._sql import affected
from privsep.server.runs import fail_or_retry


@dataclass(frozen=True)
class Held:
    """What a supervisor says it runs: task attempt, parse job and trigger ids."""

    tasks: Collection[str]
    parse_jobs: Collection[str]
    triggers: Collection[str]


def reconcile(
    session: Session,
    supervisor_id: str,
    supervisor_name: str,
    held: Held,
    now: datetime,
    grace_seconds: float,
) -> int:
    """Refresh the heartbeat of the attempts ``held`` names; take back the rest of this
    supervisor's running work claimed before ``now - grace_seconds``. Returns how many items
    were taken back."""
    cutoff = now - timedelta(seconds=grace_seconds)
    mine = (TaskAttempt.supervisor_id == supervisor_id) & (
        TaskAttempt.state == AttemptState.RUNNING
    )
    if held.tasks:
        session.execute(
            update(TaskAttempt)
            .where(mine, TaskAttempt.id.in_(list(held.tasks)))
            .values(heartbeat_at=now)
            .execution_options(synchronize_session=False)
        )
    unknown = session.scalars(
        select(TaskAttempt)
        .where(mine, TaskAttempt.id.not_in(list(held.tasks)), TaskAttempt.started_at < cutoff)
        .with_for_update()
    ).all()
    for attempt in unknown:
        fail_or_retry(
            session,
            attempt,
            f"supervisor {supervisor_name} does not hold this attempt: its claim answer was "
            "lost, or its sandbox ended without a report",
        )
        session.add(
            AuditLog(
                event="attempt_reconciled",
                actor=supervisor_name,
                subject=attempt.id,
                detail={"supervisor": supervisor_id},
            )
        )
    requeued = 0
    for model, queued, running, ids in (
        (ParseJob, ParseJobState.QUEUED, ParseJobState.RUNNING, held.parse_jobs),
        (Trigger, TriggerState.QUEUED, TriggerState.RUNNING, held.triggers),
    ):
        requeued += affected(
            session,
            update(model)
            .where(
                model.supervisor_id == supervisor_id,
                model.state == running,
                model.id.not_in(list(ids)),
                model.claimed_at < cutoff,
            )
            .values(state=queued, supervisor_id=None),
        )
    return len(unknown) + requeued


__all__ = ["Held", "reconcile"]
