"""How a run moves through its graph, through the real API on a real database.

``runs.advance`` looks only at the ended task's neighbourhood and closes the run with an
indexed check, so these cases pin down what a whole-run look used to guarantee: fan-in waits
for every upstream, a failure spreads transitively while a sibling branch still runs, and the
run ends only when the last attempt does.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from privsep.server.db import Database
from privsep.server.db.models import Run, RunState

from .api import ApiHarness, Work, bearer, task, workflow


@pytest.fixture
def api(db: Database, tmp_path: Path) -> Iterator[ApiHarness]:
    harness = ApiHarness(db, tmp_path)
    harness.register_supervisor("sup-a")
    yield harness
    harness.client.close()


def _claim(api: ApiHarness, sess: str) -> dict[str, Work]:
    return {w.body["task_id"]: w for w in api.claim(sess, ["task"])}


def _end(api: ApiHarness, work: Work, outcome: str) -> None:
    body = {} if outcome == "succeed" else {"error": "boom"}
    resp = api.client.post(f"/v1/task/{outcome}", json=body, headers=bearer(work.token))
    assert resp.status_code == 200, resp.text


def _states(api: ApiHarness, op: str, run_id: str) -> dict[str, str]:
    resp = api.client.get(f"/v1/operator/runs/{run_id}/attempts", headers=bearer(op))
    return {a["task_id"]: a["state"] for a in resp.json()["attempts"]}


def _run_state(api: ApiHarness, run_id: str) -> RunState:
    with api.state.db.read_session() as session:
        run = session.get(Run, run_id)
        assert run is not None
        return run.state


def test_fan_in_waits_for_every_upstream(api: ApiHarness) -> None:
    sess, op = api.supervisor_session("sup-a"), api.operator_session()
    api.define_workflow(
        sess, workflow("wf_fan", task("a"), task("b"), task("c"), task("join", "a", "b", "c"))
    )
    run_id = api.trigger_run(op, "wf_fan")
    roots = _claim(api, sess)
    assert set(roots) == {"a", "b", "c"}
    _end(api, roots["a"], "succeed")
    _end(api, roots["b"], "succeed")
    assert _claim(api, sess) == {}  # "join" still waits for c
    assert "join" not in _states(api, op, run_id)
    _end(api, roots["c"], "succeed")
    (join,) = _claim(api, sess).values()
    assert join.body["task_id"] == "join"
    assert _run_state(api, run_id) == RunState.RUNNING
    _end(api, join, "succeed")
    assert _run_state(api, run_id) == RunState.SUCCESS


def test_a_failure_spreads_downstream_but_the_run_waits_for_the_running_branch(
    api: ApiHarness,
) -> None:
    sess, op = api.supervisor_session("sup-a"), api.operator_session()
    api.define_workflow(
        sess,
        workflow(
            "wf_fail",
            task("bad"),
            task("slow"),
            task("mid", "bad"),
            task("leaf", "mid"),
            task("join", "slow", "mid"),
            task("after_slow", "slow"),
        ),
    )
    run_id = api.trigger_run(op, "wf_fail")
    roots = _claim(api, sess)
    _end(api, roots["bad"], "fail")
    states = _states(api, op, run_id)
    # Two levels down at once, and the fan-in that has a failed upstream too.
    assert states["mid"] == states["leaf"] == states["join"] == "upstream_failed"
    assert "after_slow" not in states
    assert _run_state(api, run_id) == RunState.RUNNING  # "slow" still runs
    _end(api, roots["slow"], "succeed")
    (after,) = _claim(api, sess).values()
    assert after.body["task_id"] == "after_slow"
    assert _run_state(api, run_id) == RunState.RUNNING
    _end(api, after, "succeed")
    assert _run_state(api, run_id) == RunState.FAILED


def test_a_retried_upstream_counts_by_its_latest_try(api: ApiHarness) -> None:
    sess, op = api.supervisor_session("sup-a"), api.operator_session()
    api.define_workflow(sess, workflow("wf_retry", task("flaky", retries=1), task("next", "flaky")))
    run_id = api.trigger_run(op, "wf_retry")
    _end(api, _claim(api, sess)["flaky"], "retry")
    assert _run_state(api, run_id) == RunState.RUNNING  # try 2 is queued
    _end(api, _claim(api, sess)["flaky"], "succeed")
    (after,) = _claim(api, sess).values()
    assert after.body["task_id"] == "next"
    _end(api, after, "succeed")
    assert _run_state(api, run_id) == RunState.SUCCESS
