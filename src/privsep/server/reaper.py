"""Take work back from supervisors that stopped heartbeating.

A supervisor that dies (kill -9, lost host) leaves attempts "running" that nobody runs. After
``supervisor_heartbeat_timeout`` they are failed or put up for retry per their task's
retries, exactly as if their sandbox had crashed; parse jobs and triggers go back to the
queue. Every change is a conditional write on "still running under that supervisor", so
several server replicas can run the reaper at once without double-counting a try.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import and_, or_, select
from sqlalchemy.orm import Session

from privsep.server.db.engine import Database
from privsep.server.db.models import (
    AttemptState,
    AuditLog,
    Supervisor,
    TaskAttempt,
    utcnow,
)
from privsep.server.db.outage import pass_failed
from privsep.server.runs import fail_or_retry, requeue_parse_jobs, requeue_triggers

log = logging.getLogger("privsep.server.reaper")


@dataclass(frozen=True)
class Reaped:
    attempts: int = 0
    parse_jobs: int = 0
    triggers: int = 0


def reap_lost_work(db: Database, timeout_seconds: float) -> Reaped:
    """One pass: end what lost supervisors were running. Returns what was taken back."""
    cutoff = utcnow() - timedelta(seconds=timeout_seconds)
    lost_supervisor = or_(
        Supervisor.last_heartbeat_at.is_(None), Supervisor.last_heartbeat_at < cutoff
    )
    attempts = parse_jobs = triggers = 0
    with db.write_session() as session:
        lost = set(session.scalars(select(Supervisor.id).where(lost_supervisor)))
        stale = session.scalars(
            select(TaskAttempt)
            .where(
                TaskAttempt.state == AttemptState.RUNNING,
                or_(
                    TaskAttempt.supervisor_id.in_(lost),
                    and_(TaskAttempt.heartbeat_at.is_not(None), TaskAttempt.heartbeat_at < cutoff),
                ),
            )
            .with_for_update()
        ).all()
        for attempt in stale:
            owner = attempt.supervisor_id
            _take_back_attempt(
                session,
                attempt,
                f"supervisor {owner} stopped heartbeating for more than {timeout_seconds:g} s",
                "attempt_reaped",
            )
            attempts += 1
        if lost:
            parse_jobs = requeue_parse_jobs(session, lost)
            triggers = requeue_triggers(session, lost)
    if attempts or parse_jobs or triggers:
        log.warning(
            "took back %d attempts, %d parse jobs, %d triggers from lost supervisors",
            attempts,
            parse_jobs,
            triggers,
        )
    return Reaped(attempts, parse_jobs, triggers)


def _take_back_attempt(session: Session, attempt: TaskAttempt, reason: str, event: str) -> None:
    """End one running attempt as lost (failed, or up for retry with a new queued try) and
    record why: the one way work is taken back from a supervisor."""
    owner = attempt.supervisor_id
    fail_or_retry(session, attempt, reason)
    session.add(AuditLog(event=event, subject=attempt.id, detail={"supervisor": owner}))


def take_back_from(session: Session, supervisor_id: str, reason: str, event: str) -> Reaped:
    """Take back everything ``supervisor_id`` holds, in the caller's transaction: its running
    attempts as the reaper does (so their work tokens die with them and another supervisor
    runs the retry), its parse jobs and triggers back to the queue.

    For a supervisor that was revoked or re-keyed, or that restarted: whatever it held was
    granted to a session that no longer counts."""
    held = session.scalars(
        select(TaskAttempt)
        .where(
            TaskAttempt.supervisor_id == supervisor_id, TaskAttempt.state == AttemptState.RUNNING
        )
        .with_for_update()
    ).all()
    for attempt in held:
        _take_back_attempt(session, attempt, reason, event)
    parse_jobs = requeue_parse_jobs(session, [supervisor_id])
    triggers = requeue_triggers(session, [supervisor_id])
    return Reaped(len(held), parse_jobs, triggers)


class ReaperThread(threading.Thread):
    """Runs :func:`reap_lost_work` every ``interval`` seconds until stopped."""

    def __init__(self, db: Database, timeout_seconds: float, interval: float) -> None:
        super().__init__(name="privsep-reaper", daemon=True)
        self.db = db
        self.timeout_seconds = timeout_seconds
        self.interval = interval
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            try:
                reap_lost_work(self.db, self.timeout_seconds)
            except Exception as exc:  # a database hiccup must not kill the thread
                pass_failed(log, self.db.incidents, exc, "the reaper pass")

    def stop(self) -> None:
        self._stop_event.set()
