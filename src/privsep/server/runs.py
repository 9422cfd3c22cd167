"""How a run moves: which attempts to queue, retry or skip when one ends.

This runs inside the transaction that ends an attempt, so a finished upstream task makes its
downstream runnable at once (no poll), and two replicas can never both queue the same
downstream attempt: the unique ``(run_id, task_id, try_number)`` constraint rejects the second.
"""

from __future__ import annotations

import json
from datetime import timedelta
from functools import lru_cache

from sqlalchemy import select
from sqlalchemy.orm import Session

from privsep.server.db.models import (
    AttemptState,
    Run,
    RunState,
    TaskAttempt,
    WorkflowVersion,
    utcnow,
)
from privsep.server.schemas import TaskDefinition, WorkflowDefinition

FINAL_OK = frozenset({AttemptState.SUCCESS, AttemptState.SKIPPED})
FINAL_BAD = frozenset({AttemptState.FAILED, AttemptState.UPSTREAM_FAILED})


@lru_cache(maxsize=256)
def _parse_definition(text: str) -> WorkflowDefinition:
    return WorkflowDefinition.model_validate(json.loads(text), strict=False)


def definition_of(session: Session, run: Run) -> WorkflowDefinition:
    version = session.get(WorkflowVersion, run.workflow_version_id)
    if version is None:
        raise LookupError(f"run {run.id} names a missing workflow version")
    return _parse_definition(version.definition)


def task_definition(session: Session, run: Run, task_id: str) -> TaskDefinition:
    for task in definition_of(session, run).tasks:
        if task.task_id == task_id:
            return task
    raise LookupError(f"task {task_id!r} is not in run {run.id}'s workflow version")


def _latest_attempts(session: Session, run_id: str) -> dict[str, TaskAttempt]:
    latest: dict[str, TaskAttempt] = {}
    for attempt in session.scalars(select(TaskAttempt).where(TaskAttempt.run_id == run_id)):
        seen = latest.get(attempt.task_id)
        if seen is None or attempt.try_number > seen.try_number:
            latest[attempt.task_id] = attempt
    return latest


def start_run(session: Session, run: Run) -> None:
    """Queue the tasks of a new run that have no upstream."""
    definition = definition_of(session, run)
    run.state = RunState.RUNNING
    run.started_at = utcnow()
    for task in definition.tasks:
        if not task.upstream:
            session.add(TaskAttempt(run_id=run.id, task_id=task.task_id, try_number=1))
    if not definition.tasks:
        run.state = RunState.SUCCESS
        run.ended_at = utcnow()


def fail_or_retry(
    session: Session, attempt: TaskAttempt, error: str, *, allow_retry: bool = True
) -> AttemptState:
    """End a running attempt as failed, or up for retry with a new queued try."""
    run = session.get(Run, attempt.run_id)
    if run is None:
        raise LookupError(f"attempt {attempt.id} names a missing run")
    task = task_definition(session, run, attempt.task_id)
    now = utcnow()
    attempt.ended_at = now
    attempt.error = error[:65536]
    if allow_retry and attempt.try_number <= task.retries:
        attempt.state = AttemptState.UP_FOR_RETRY
        session.add(
            TaskAttempt(
                run_id=run.id,
                task_id=attempt.task_id,
                try_number=attempt.try_number + 1,
                next_try_at=now + timedelta(seconds=task.retry_delay),
            )
        )
        return attempt.state
    attempt.state = AttemptState.FAILED
    advance(session, run)
    return attempt.state


def advance(session: Session, run: Run) -> None:
    """Queue downstream tasks whose upstream all succeeded, skip those of failed ones, and
    close the run when every task has ended."""
    definition = definition_of(session, run)
    session.flush()
    latest = _latest_attempts(session, run.id)
    changed = True
    while changed:  # upstream_failed propagates through the graph
        changed = False
        for task in definition.tasks:
            if task.task_id in latest or not task.upstream:
                continue
            ups = [latest.get(u) for u in task.upstream]
            if any(a is not None and a.state in FINAL_BAD for a in ups):
                now = utcnow()
                attempt = TaskAttempt(
                    run_id=run.id,
                    task_id=task.task_id,
                    try_number=1,
                    state=AttemptState.UPSTREAM_FAILED,
                    started_at=now,
                    ended_at=now,
                )
                session.add(attempt)
                latest[task.task_id] = attempt
                changed = True
            elif all(a is not None and a.state in FINAL_OK for a in ups):
                attempt = TaskAttempt(run_id=run.id, task_id=task.task_id, try_number=1)
                session.add(attempt)
                latest[task.task_id] = attempt
    if len(latest) == len(definition.tasks) and all(
        a.state in FINAL_OK | FINAL_BAD for a in latest.values()
    ):
        ok = all(a.state in FINAL_OK for a in latest.values())
        run.state = RunState.SUCCESS if ok else RunState.FAILED
        run.ended_at = utcnow()
