"""How a run moves: which attempts to queue, retry or skip when one ends.

This runs inside the transaction that ends an attempt, so a finished upstream task makes its
downstream runnable at once (no poll), and two replicas can never both queue the same
downstream attempt: the unique ``(run_id, task_id, try_number)`` constraint rejects the second.

The work is proportional to the ended task's neighbourhood, not to the run: :func:`advance`
looks only at the ended task's downstream tasks and their upstream, and checks whether the run
is over with one indexed ``EXISTS`` (``ix_task_attempts_run_id_state``). Only when no attempt of
the run is left unfinished does it look at the whole run, once, to close it. Looking at the
whole run on every success made a run of *n* tasks cost O(n²) and held SQLite's write lock
for most of a large run.

Whoever ends an attempt first takes the run's row lock (:func:`lock_run`), before it reads
anything of the run. Under PostgreSQL's READ COMMITTED, two attempts of one run that ended at
the same moment could otherwise each read the other as still running (neither had committed),
so neither closed the run, and neither queued a downstream task that waited for both. With the
lock the second one in waits for the first to commit, and its reads, each a new snapshot, see
that commit. SQLite needs no lock: a write transaction there (``BEGIN IMMEDIATE``) already
holds the only write lock, and the statement renders without ``FOR UPDATE``. Locks are always
taken attempt first, then run, so these transactions cannot deadlock each other.

A run closes with a conditional write (still ``running``), so it closes once. The scheduler's
repair pass (:func:`repair_run`) closes any run that was left open all the same.
"""

from __future__ import annotations

import json
import threading
import weakref
from collections import OrderedDict
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import Engine, bindparam, select, update
from sqlalchemy.orm import Session

from privsep.server.db.models import (
    AttemptState,
    ParseJob,
    ParseJobState,
    Run,
    RunState,
    TaskAttempt,
    Trigger,
    TriggerState,
    WorkflowVersion,
    utcnow,
)
from privsep.server.routes._sql import affected
from privsep.server.schemas import TaskDefinition, WorkflowDefinition

FINAL_OK = frozenset({AttemptState.SUCCESS, AttemptState.SKIPPED})
FINAL_BAD = frozenset({AttemptState.FAILED, AttemptState.UPSTREAM_FAILED})
# An up_for_retry attempt is always followed by a queued try, so it never keeps a run open.
UNFINISHED = (AttemptState.QUEUED, AttemptState.RUNNING, AttemptState.DEFERRED)


@dataclass(frozen=True)
class Graph:
    """A workflow version's tasks, indexed both ways. Versions never change once stored, so
    one is built per version and process, not per request."""

    definition: WorkflowDefinition
    tasks: dict[str, TaskDefinition]
    downstream: dict[str, tuple[str, ...]]
    bundle_version: str = ""
    source_uri: str | None = None

    @classmethod
    def of(
        cls, definition: WorkflowDefinition, bundle_version: str = "", source_uri: str | None = None
    ) -> Graph:
        downstream: dict[str, list[str]] = {task.task_id: [] for task in definition.tasks}
        for task in definition.tasks:
            for up in task.upstream:
                downstream.setdefault(up, []).append(task.task_id)
        return cls(
            definition=definition,
            tasks={task.task_id: task for task in definition.tasks},
            downstream={k: tuple(v) for k, v in downstream.items()},
            bundle_version=bundle_version,
            source_uri=source_uri,
        )


class _GraphCache:
    """The graphs of the most recently used workflow versions, per engine (a process may
    serve more than one database: tests do) and version id. Keyed by the engine object, not
    its URL: nothing is rendered on the hot path, and a database made again at the same path
    by a new engine never sees the old one's graphs."""

    def __init__(self, size: int = 256) -> None:
        self._size = size
        self._graphs: weakref.WeakKeyDictionary[Engine, OrderedDict[int, Graph]] = (
            weakref.WeakKeyDictionary()
        )
        self._lock = threading.Lock()

    def get(self, session: Session, version_id: int) -> Graph:
        engine = session.get_bind().engine
        with self._lock:
            graphs = self._graphs.get(engine)
            graph = graphs.get(version_id) if graphs is not None else None
            if graphs is not None and graph is not None:
                graphs.move_to_end(version_id)
                return graph
        row = session.execute(
            select(
                WorkflowVersion.definition,
                WorkflowVersion.bundle_version,
                WorkflowVersion.source_uri,
            ).where(WorkflowVersion.id == version_id)
        ).first()
        if row is None:
            raise LookupError(f"workflow version {version_id} is missing")
        text, bundle_version, source_uri = row
        definition = WorkflowDefinition.model_validate(json.loads(text), strict=False)
        graph = Graph.of(definition, bundle_version or "", source_uri)
        with self._lock:
            graphs = self._graphs.setdefault(engine, OrderedDict())
            graphs[version_id] = graph
            while len(graphs) > self._size:
                graphs.popitem(last=False)
        return graph


_graphs = _GraphCache()


def graph_of(session: Session, run: Run) -> Graph:
    return _graphs.get(session, run.workflow_version_id)


def version_graph(session: Session, version_id: int) -> Graph:
    """The graph (and provenance) of one stored workflow version, cached."""
    return _graphs.get(session, version_id)


def definition_of(session: Session, run: Run) -> WorkflowDefinition:
    return graph_of(session, run).definition


def task_definition(session: Session, run: Run, task_id: str) -> TaskDefinition:
    task = graph_of(session, run).tasks.get(task_id)
    if task is None:
        raise LookupError(f"task {task_id!r} is not in run {run.id}'s workflow version")
    return task


def new_attempt(run_id: str, task: TaskDefinition, **values: Any) -> TaskAttempt:
    """A new attempt row of ``task`` (try 1, queued, unless ``values`` say otherwise), on the
    task's work queue: every attempt is made here, so none can miss its queue."""
    values.setdefault("try_number", 1)
    return TaskAttempt(run_id=run_id, task_id=task.task_id, queue=task.queue, **values)


def _latest_states(
    session: Session, run_id: str, task_ids: Iterable[str] | None = None
) -> dict[str, AttemptState]:
    """The state of each task's latest try (of ``task_ids`` only, when given)."""
    query = select(TaskAttempt.task_id, TaskAttempt.try_number, TaskAttempt.state).where(
        TaskAttempt.run_id == run_id
    )
    if task_ids is not None:
        wanted = sorted(set(task_ids))
        if not wanted:
            return {}
        query = query.where(TaskAttempt.task_id.in_(wanted))
    latest: dict[str, tuple[int, AttemptState]] = {}
    for task_id, try_number, state in session.execute(query):
        seen = latest.get(task_id)
        if seen is None or try_number > seen[0]:
            latest[task_id] = (try_number, state)
    return {task_id: state for task_id, (_, state) in latest.items()}


def start_run(session: Session, run: Run) -> None:
    """Queue the tasks of a new run that have no upstream."""
    definition = definition_of(session, run)
    run.state = RunState.RUNNING
    run.started_at = utcnow()
    for task in definition.tasks:
        if not task.upstream:
            session.add(new_attempt(run.id, task))
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
            new_attempt(
                run.id,
                task,
                try_number=attempt.try_number + 1,
                next_try_at=now + timedelta(seconds=task.retry_delay),
            )
        )
        return attempt.state
    attempt.state = AttemptState.FAILED
    advance(session, run, attempt.task_id)
    return attempt.state


# Built once (statement construction costs about as much Python as its execution).
_ANY_UNFINISHED = (
    select(TaskAttempt.id)
    .where(TaskAttempt.run_id == bindparam("run_id"), TaskAttempt.state.in_(UNFINISHED))
    .limit(1)
)
_LOCK_RUN = (
    select(Run.workflow_version_id, Run.state)
    .where(Run.id == bindparam("run_id"))
    .with_for_update()
)


def lock_run(session: Session, run_id: str) -> tuple[int, RunState] | None:
    """Hold the run's row lock until the transaction ends (PostgreSQL; on SQLite the write
    transaction already serialises writers) and read its version and state; ``None`` if the
    run is gone. Take it after the attempt's own write, never before (see the module
    docstring)."""
    row = session.execute(_LOCK_RUN, {"run_id": run_id}).first()
    return None if row is None else (row.workflow_version_id, row.state)


def advance(session: Session, run: Run, ended_task_id: str | None = None) -> None:
    """After ``ended_task_id`` ended (its new state already set on the session): queue its
    downstream tasks whose upstream all succeeded, mark those of a failed upstream (and theirs,
    transitively) ``upstream_failed``, and close the run when every task has ended.

    Without ``ended_task_id`` the whole run is looked at (the slow, complete form)."""
    session.flush()
    advance_run(session, run.id, ended_task_id)


def advance_run(session: Session, run_id: str, ended_task_id: str | None = None) -> None:
    """:func:`advance` by id, for callers that changed the attempt with a Core statement.
    Takes the run's lock first, so every read below sees what the run's other writers
    committed."""
    locked = lock_run(session, run_id)
    if locked is None:
        return
    graph = version_graph(session, locked[0])
    if ended_task_id is None:
        _settle_whole_run(session, run_id, graph)
        return
    if graph.downstream.get(ended_task_id):
        _queue_downstream(session, run_id, graph, ended_task_id)
    unfinished = session.execute(_ANY_UNFINISHED, {"run_id": run_id}).first()
    if unfinished is None:
        _settle_whole_run(session, run_id, graph)


@dataclass(frozen=True)
class Repair:
    """What :func:`repair_run` did to a run left open: the state it closed it with (``None``
    if it is still running) and how many tasks it queued that nobody had queued."""

    closed: RunState | None
    queued: int

    def __bool__(self) -> bool:
        return self.closed is not None or self.queued > 0


def repair_run(session: Session, run_id: str) -> Repair:
    """Settle a run that is ``running`` with no attempt left unfinished: queue what is due,
    or close it. Nothing, if another writer moved the run on meanwhile (checked under the
    run's lock)."""
    locked = lock_run(session, run_id)
    if locked is None or locked[1] != RunState.RUNNING:
        return Repair(None, 0)
    if session.execute(_ANY_UNFINISHED, {"run_id": run_id}).first() is not None:
        return Repair(None, 0)
    return _settle_whole_run(session, run_id, version_graph(session, locked[0]))


def _queue_downstream(session: Session, run_id: str, graph: Graph, ended_task_id: str) -> None:
    """Breadth first from the ended task: each downstream task without an attempt yet gets one
    once its upstream are all final (queued if all succeeded, else upstream_failed, which
    spreads further)."""
    frontier = [ended_task_id]
    while frontier:
        candidates = {d for t in frontier for d in graph.downstream.get(t, ())}
        if not candidates:
            return
        upstream = {u for d in candidates for u in graph.tasks[d].upstream}
        latest = _latest_states(session, run_id, candidates | upstream)
        frontier = []
        now = utcnow()
        for task_id in sorted(candidates):
            if task_id in latest:
                continue  # already queued (or ended) by an earlier upstream's end
            ups = [latest.get(u) for u in graph.tasks[task_id].upstream]
            if any(state in FINAL_BAD for state in ups):
                session.add(
                    new_attempt(
                        run_id,
                        graph.tasks[task_id],
                        state=AttemptState.UPSTREAM_FAILED,
                        started_at=now,
                        ended_at=now,
                    )
                )
                frontier.append(task_id)
            elif all(state in FINAL_OK for state in ups):
                session.add(new_attempt(run_id, graph.tasks[task_id]))
        session.flush()


def _settle_whole_run(session: Session, run_id: str, graph: Graph) -> Repair:
    """Look at every task of the run: queue or skip whatever is due, close the run if all
    ended. Runs when nothing of the run is left unfinished (so once or twice per run)."""
    latest = _latest_states(session, run_id)
    queued = 0
    changed = True
    while changed:  # upstream_failed propagates through the graph
        changed = False
        for task in graph.definition.tasks:
            if task.task_id in latest or not task.upstream:
                continue
            ups = [latest.get(u) for u in task.upstream]
            if any(state in FINAL_BAD for state in ups):
                now = utcnow()
                session.add(
                    new_attempt(
                        run_id,
                        task,
                        state=AttemptState.UPSTREAM_FAILED,
                        started_at=now,
                        ended_at=now,
                    )
                )
                latest[task.task_id] = AttemptState.UPSTREAM_FAILED
                changed = True
            elif all(state in FINAL_OK for state in ups):
                session.add(new_attempt(run_id, task))
                latest[task.task_id] = AttemptState.QUEUED
                queued += 1
    if len(latest) == len(graph.tasks) and all(
        state in FINAL_OK | FINAL_BAD for state in latest.values()
    ):
        final = (
            RunState.SUCCESS
            if all(state in FINAL_OK for state in latest.values())
            else RunState.FAILED
        )
        closed = affected(
            session,
            update(Run)
            .where(Run.id == run_id, Run.state == RunState.RUNNING)
            .values(state=final, ended_at=utcnow()),
        )
        return Repair(final if closed else None, queued)
    return Repair(None, queued)


def requeue_parse_jobs(session: Session, supervisor_ids: Collection[str]) -> int:
    """Queue again the parse jobs running under these supervisors, which will never report
    them (restarted or lost). Returns how many."""
    return affected(
        session,
        update(ParseJob)
        .where(ParseJob.state == ParseJobState.RUNNING, ParseJob.supervisor_id.in_(supervisor_ids))
        .values(state=ParseJobState.QUEUED, supervisor_id=None),
    )


def requeue_triggers(session: Session, supervisor_ids: Collection[str]) -> int:
    """Queue again the triggers running under these supervisors, which will never report
    them (restarted, lost, or their trigger sandbox died): the next trigger sandbox runs them.
    Returns how many."""
    return affected(
        session,
        update(Trigger)
        .where(Trigger.state == TriggerState.RUNNING, Trigger.supervisor_id.in_(supervisor_ids))
        .values(state=TriggerState.QUEUED, supervisor_id=None),
    )
