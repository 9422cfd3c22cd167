"""What the scheduler tests share: a controlled clock, workflows and runs made directly in the
database, and real races between replicas (threads with engines of their own)."""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from privsep.server.db import Database
from privsep.server.db.models import (
    AttemptState,
    Run,
    RunTriggerKind,
    TaskAttempt,
    Trigger,
    Workflow,
    WorkflowVersion,
    version_digest,
)
from privsep.server.runs import start_run
from privsep.server.scheduler.facts import cache as version_facts

from .api import task

R = TypeVar("R")
T0 = datetime(2024, 3, 5, 10, 17, 23, 500_000, tzinfo=UTC)  # a Tuesday, off any tick


def at(hour: int, minute: int = 0, second: int = 0, microsecond: int = 0) -> datetime:
    return T0.replace(hour=hour, minute=minute, second=second, microsecond=microsecond)


@pytest.fixture(autouse=True)
def _fresh_version_cache() -> None:
    """The parsed-version cache is per process; start each test without it, so a warning
    logged when a version is first parsed shows up in every test that expects it."""
    version_facts.clear()


# --- helpers -----------------------------------------------------------------------------------


def definition(
    workflow_id: str, schedule: str | float | None, *tasks: dict[str, Any]
) -> dict[str, Any]:
    return {
        "workflow_id": workflow_id,
        "schedule": schedule,
        "tasks": list(tasks) or [task("only")],
    }


def add_version(db: Database, wf: dict[str, Any], bundle_version: str = "") -> int:
    """Store ``wf`` as its workflow's current version, exactly as the parse route would."""
    text = json.dumps(wf, sort_keys=True, separators=(",", ":"))
    uri = f"file:///w/{wf['workflow_id']}.py#sha256={hashlib.sha256(text.encode()).hexdigest()}"
    with db.write_session() as session:
        version = WorkflowVersion(
            workflow_id=wf["workflow_id"],
            definition=text,
            bundle_version=bundle_version,
            content_hash=version_digest(text, uri),
            source_uri=uri,
        )
        session.add(version)
        session.flush()
        session.execute(
            update(Workflow)
            .where(Workflow.id == wf["workflow_id"])
            .values(current_version_id=version.id)
        )
        return version.id


def make_workflow(
    db: Database,
    workflow_id: str,
    schedule: str | float | None,
    *tasks: dict[str, Any],
    created_at: datetime = T0,
    active: bool = True,
) -> int:
    with db.write_session() as session:
        session.add(Workflow(id=workflow_id, created_at=created_at, active=active))
    return add_version(db, definition(workflow_id, schedule, *tasks))


def detached(session: Session, rows: list[R]) -> list[R]:
    """``rows``, usable after the read session ends (its rollback would expire them)."""
    session.expunge_all()
    return rows


def scheduled_runs(db: Database, workflow_id: str | None = None) -> list[Run]:
    with db.read_session() as session:
        query = select(Run).where(Run.trigger_kind == RunTriggerKind.SCHEDULE)
        if workflow_id is not None:
            query = query.where(Run.workflow_id == workflow_id)
        return detached(session, list(session.scalars(query.order_by(Run.logical_date))))


def logical_dates(db: Database, workflow_id: str | None = None) -> list[datetime]:
    return [run.logical_date for run in scheduled_runs(db, workflow_id) if run.logical_date]


def attempts(db: Database, run_id: str | None = None) -> list[TaskAttempt]:
    with db.read_session() as session:
        query = select(TaskAttempt).order_by(TaskAttempt.task_id, TaskAttempt.try_number)
        if run_id is not None:
            query = query.where(TaskAttempt.run_id == run_id)
        return detached(session, list(session.scalars(query)))


def manual_run(db: Database, workflow_id: str) -> str:
    """A run started the way the operator route starts one."""
    with db.write_session() as session:
        wf = session.get(Workflow, workflow_id)
        assert wf is not None and wf.current_version_id is not None
        run = Run(workflow_id=workflow_id, workflow_version_id=wf.current_version_id)
        session.add(run)
        session.flush()
        start_run(session, run)
        return run.id


def set_attempt(db: Database, attempt_id: str, **values: Any) -> None:
    with db.write_session() as session:
        session.execute(update(TaskAttempt).where(TaskAttempt.id == attempt_id).values(**values))


def defer(db: Database, attempt_id: str, deadline: datetime | None) -> str:
    """Park an attempt on a trigger the way the defer route does; returns the trigger id."""
    with db.write_session() as session:
        attempt = session.get(TaskAttempt, attempt_id)
        assert attempt is not None
        trigger = Trigger(attempt_id=attempt_id, serialized={"module": "m", "qualname": "q"})
        session.add(trigger)
        session.flush()
        attempt.state = AttemptState.DEFERRED
        attempt.trigger_id = trigger.id
        attempt.supervisor_id = None
        attempt.next_try_at = deadline
        return trigger.id


def race(url: str, threads: int, body: Callable[[Database], Any]) -> list[Any]:
    """Run ``body`` in ``threads`` threads at once, each with its own engine; their results."""
    barrier = threading.Barrier(threads)
    results: list[Any] = [None] * threads
    errors: list[BaseException] = []

    def worker(index: int) -> None:
        database = Database.from_url(url)
        try:
            barrier.wait(timeout=30)
            results[index] = body(database)
        except BaseException as exc:
            errors.append(exc)
        finally:
            database.dispose()

    pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join(timeout=120)
    assert not errors, errors
    return results
