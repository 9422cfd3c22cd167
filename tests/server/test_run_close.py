"""A run closes exactly once, whatever the interleaving of its last attempts, and a run left
open all the same is closed by the scheduler's repair pass.

The race needs real PostgreSQL: under READ COMMITTED two attempts of one run that end at the
same moment each read the other as still running (neither has committed), so without the
run's row lock neither closes the run. Many threads end the last attempts of many runs at once,
through the same function the ``/v1/task/succeed`` route and the fast path run; a trigger in
the test's own database counts every write that gives a run a final state.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import delete, func, select, text, update

from privsep.server.auth import task_token_of, verify_silently
from privsep.server.db import Database
from privsep.server.db.models import AttemptState, AuditLog, Run, RunState, TaskAttempt
from privsep.server.scheduler import scheduler_pass
from privsep.server.services import attempts

from .api import ApiHarness, Work, bearer, task, workflow
from .postgres import PostgresCluster

RUNS = 40
PARALLEL = 3  # tasks per run, all of them ending at once
WAVE = 8  # runs raced at a time (PARALLEL threads each)

_COUNT_CLOSINGS = """
CREATE TABLE test_run_closings (run_id text NOT NULL, state text NOT NULL);
CREATE FUNCTION test_count_closing() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO test_run_closings VALUES (NEW.id, NEW.state::text);
    RETURN NEW;
END $$;
CREATE TRIGGER test_count_closing AFTER UPDATE ON runs FOR EACH ROW
    WHEN (NEW.state::text IN ('success', 'failed')) EXECUTE FUNCTION test_count_closing();
"""


@pytest.fixture
def pg_db(postgres_cluster: PostgresCluster, _postgres_template: str) -> Iterator[Database]:
    """A fresh PostgreSQL database at head, with a pool large enough for every racing thread."""
    name = postgres_cluster.create_database(template=_postgres_template)
    database = Database.from_url(
        postgres_cluster.url(name), pool_size=WAVE * PARALLEL, max_overflow=4
    )
    try:
        yield database
    finally:
        database.dispose()
        postgres_cluster.drop_database(name)


def _claim_all(api: ApiHarness, sess: str) -> list[Work]:
    items: list[Work] = []
    while batch := api.claim(sess, ["task"], 100):
        items += batch
    return items


def test_runs_whose_last_attempts_end_at_once_each_close_once(
    pg_db: Database, tmp_path: Path
) -> None:
    api = ApiHarness(pg_db, tmp_path)
    api.register_supervisor("sup-a")
    sess, op = api.supervisor_session("sup-a"), api.operator_session()
    with pg_db.engine.begin() as conn:
        conn.exec_driver_sql(_COUNT_CLOSINGS)
    names = [f"t{i}" for i in range(PARALLEL)]
    api.define_workflow(sess, workflow("wf_wide", *(task(n) for n in names)))
    run_ids = [api.trigger_run(op, "wf_wide") for _ in range(RUNS)]
    by_run: dict[str, list[Work]] = {}
    for work in _claim_all(api, sess):
        by_run.setdefault(work.body["run_id"], []).append(work)
    assert sorted(by_run) == sorted(run_ids)
    assert all(len(works) == PARALLEL for works in by_run.values())

    def finish(work: Work, barrier: threading.Barrier) -> None:
        claims = verify_silently(api.state, work.token, frozenset({"task"}))
        assert claims is not None
        barrier.wait(timeout=30)  # every attempt of the run ends at the same moment
        attempts.finish_success(api.state, task_token_of(claims), None)

    with ThreadPoolExecutor(max_workers=WAVE * PARALLEL) as pool:
        for start in range(0, RUNS, WAVE):
            wave = run_ids[start : start + WAVE]
            futures = []
            for run_id in wave:
                barrier = threading.Barrier(PARALLEL)
                futures += [pool.submit(finish, w, barrier) for w in by_run[run_id]]
            for future in futures:
                future.result(timeout=60)

    with pg_db.read_session() as session:
        states = {row.id: row.state for row in session.execute(select(Run.id, Run.state))}
        closings = {
            row.run_id: row.n
            for row in session.execute(
                text("SELECT run_id, count(*) AS n FROM test_run_closings GROUP BY run_id")
            )
        }
    left_open = [run_id for run_id in run_ids if states[run_id] != RunState.SUCCESS]
    assert not left_open, f"{len(left_open)} of {RUNS} runs never closed"
    assert closings == {run_id: 1 for run_id in run_ids}
    # Nothing was left for the backstop: the runs closed where their last attempt ended.
    assert scheduler_pass(pg_db, datetime.now(UTC)).runs_repaired == 0
    api.client.close()


# --- the repair pass, on both backends ----------------------------------------------------------


@pytest.fixture
def api(db: Database, tmp_path: Path) -> Iterator[ApiHarness]:
    harness = ApiHarness(db, tmp_path)
    harness.register_supervisor("sup-a")
    yield harness
    harness.client.close()


def _end_all(api: ApiHarness, sess: str, outcome: str) -> None:
    for work in _claim_all(api, sess):
        body = {} if outcome == "succeed" else {"error": "boom"}
        resp = api.client.post(f"/v1/task/{outcome}", json=body, headers=bearer(work.token))
        assert resp.status_code == 200, resp.text


def _reopen(db: Database, run_id: str) -> None:
    """What the race used to leave behind: every attempt final, the run still running."""
    with db.write_session() as session:
        session.execute(
            update(Run).where(Run.id == run_id).values(state=RunState.RUNNING, ended_at=None)
        )


def _repairs(db: Database, run_id: str) -> list[dict[str, object] | None]:
    with db.read_session() as session:
        return list(
            session.scalars(
                select(AuditLog.detail).where(
                    AuditLog.event == "run_repaired", AuditLog.subject == run_id
                )
            )
        )


@pytest.mark.parametrize(("outcome", "closed"), [("succeed", "success"), ("fail", "failed")])
def test_the_repair_pass_closes_a_run_left_open(
    api: ApiHarness, outcome: str, closed: str, caplog: pytest.LogCaptureFixture
) -> None:
    sess, op = api.supervisor_session("sup-a"), api.operator_session()
    api.define_workflow(sess, workflow("wf_two", task("a"), task("b")))
    run_id = api.trigger_run(op, "wf_two")
    _end_all(api, sess, outcome)
    db = api.state.db
    _reopen(db, run_id)

    result = scheduler_pass(db, datetime.now(UTC))
    assert result.runs_repaired == 1 and not result.errors
    with db.read_session() as session:
        run = session.get(Run, run_id)
        assert run is not None and run.state == closed and run.ended_at is not None
    assert _repairs(db, run_id) == [{"closed": closed, "queued": 0}]
    assert [r.getMessage() for r in caplog.records if run_id in r.getMessage()] == [
        f"run {run_id} was left running after all its attempts ended: closed it as {closed}"
    ]
    # Said once: the next pass finds nothing more to do.
    assert scheduler_pass(db, datetime.now(UTC)).runs_repaired == 0
    assert len(_repairs(db, run_id)) == 1


def test_the_repair_pass_queues_a_task_nobody_queued(api: ApiHarness) -> None:
    """The other half of the same race: a join whose upstream ended at once, each thinking the
    other still ran, was never queued. The pass queues it, and the run goes on."""
    sess, op = api.supervisor_session("sup-a"), api.operator_session()
    api.define_workflow(sess, workflow("wf_join", task("a"), task("b"), task("join", "a", "b")))
    run_id = api.trigger_run(op, "wf_join")
    _end_all(api, sess, "succeed")  # a and b
    db = api.state.db
    with db.write_session() as session:
        session.execute(
            delete(TaskAttempt).where(TaskAttempt.run_id == run_id, TaskAttempt.task_id == "join")
        )

    assert scheduler_pass(db, datetime.now(UTC)).runs_repaired == 1
    assert _repairs(db, run_id) == [{"closed": None, "queued": 1}]
    (join,) = _claim_all(api, sess)
    assert join.body["task_id"] == "join"
    resp = api.client.post("/v1/task/succeed", json={}, headers=bearer(join.token))
    assert resp.status_code == 200, resp.text
    with db.read_session() as session:
        assert session.scalar(select(Run.state).where(Run.id == run_id)) == RunState.SUCCESS
        unfinished = session.scalar(
            select(func.count())
            .select_from(TaskAttempt)
            .where(TaskAttempt.run_id == run_id, TaskAttempt.state != AttemptState.SUCCESS)
        )
    assert unfinished == 0
