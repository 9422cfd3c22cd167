"""Reconciliation through the heartbeat, against a real database (SQLite and PostgreSQL).

A claim answer lost after the server committed it leaves an attempt "running" under a live
supervisor that never heard of it. Its heartbeats must not keep that attempt alive: the server
takes back whatever the supervisor does not list, once the claim is older than the grace
period (a quarter of the heartbeat timeout). The clock is moved by writing the claim time back
into the row, as time passing would; nothing in the server is stubbed.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import update

from privsep.server.db import Database
from privsep.server.db.models import AttemptState, AuditLog, ParseJob, TaskAttempt, utcnow

from .api import ApiHarness, bearer, error_code, task, workflow

TIMEOUT = 120  # the harness's heartbeat timeout: the grace period is 30 s


@pytest.fixture
def api(db: Database, tmp_path: Path) -> Iterator[ApiHarness]:
    harness = ApiHarness(db, tmp_path, supervisor_heartbeat_timeout=TIMEOUT)
    harness.register_supervisor("sup-a")
    harness.register_supervisor("sup-b")
    yield harness
    harness.client.close()


def _age_claims(api: ApiHarness, seconds: float) -> None:
    """Move every claim ``seconds`` into the past, as waiting that long would."""
    then = utcnow() - timedelta(seconds=seconds)
    with api.state.db.write_session() as session:
        session.execute(update(TaskAttempt).values(started_at=then))
        session.execute(update(ParseJob).values(claimed_at=then))


def _state(api: ApiHarness, attempt_id: str) -> AttemptState:
    with api.state.db.read_session() as session:
        row = session.get(TaskAttempt, attempt_id)
        assert row is not None
        return row.state


def _heartbeat(api: ApiHarness, sess: str, **held: list[str]) -> None:
    resp = api.client.post("/v1/supervisor/heartbeat", json=held, headers=bearer(sess))
    assert resp.status_code == 200, resp.text


def test_an_attempt_the_supervisor_does_not_hold_is_taken_back(api: ApiHarness) -> None:
    sess = api.supervisor_session("sup-a")
    op = api.operator_session()
    api.define_workflow(sess, workflow("wf_r", task("known", retries=1), task("lost", retries=1)))
    api.trigger_run(op, "wf_r")
    items = {w.body["task_id"]: w for w in api.claim(sess, ["task"])}
    known, lost = items["known"], items["lost"]

    # Within the grace period a claim may still be on its way: nothing is taken back.
    _heartbeat(api, sess, tasks=[known.id])
    assert _state(api, lost.id) == AttemptState.RUNNING

    _age_claims(api, TIMEOUT / 4 + 5)
    _heartbeat(api, sess, tasks=[known.id])
    assert _state(api, known.id) == AttemptState.RUNNING
    assert _state(api, lost.id) == AttemptState.UP_FOR_RETRY
    # The lost claim's token is dead, and its retry goes to whoever claims next.
    resp = api.client.get("/v1/task/context", headers=bearer(lost.token))
    assert resp.status_code == 401 and error_code(resp) == "revoked"
    assert api.client.get("/v1/task/context", headers=bearer(known.token)).status_code == 200
    (retry,) = api.claim(api.supervisor_session("sup-b"), ["task"])
    assert retry.body["task_id"] == "lost" and retry.body["try_number"] == 2
    with api.state.db.read_session() as session:
        events = session.query(AuditLog).filter(AuditLog.event == "attempt_reconciled").all()
        assert [e.subject for e in events] == [lost.id]

    # A second replica reconciling the same heartbeat takes nothing more.
    _heartbeat(api, sess, tasks=[known.id])
    assert _state(api, known.id) == AttemptState.RUNNING


def test_a_heartbeat_keeps_alive_only_what_it_lists(api: ApiHarness) -> None:
    sess = api.supervisor_session("sup-a")
    op = api.operator_session()
    api.define_workflow(sess, workflow("wf_h", task("t")))
    api.trigger_run(op, "wf_h")
    (item,) = api.claim(sess, ["task"])
    with api.state.db.write_session() as session:
        session.execute(update(TaskAttempt).values(heartbeat_at=None))
    _heartbeat(api, sess, tasks=[])  # within grace: left alone, and not refreshed either
    with api.state.db.read_session() as session:
        row = session.get(TaskAttempt, item.id)
        assert row is not None and row.heartbeat_at is None
    _heartbeat(api, sess, tasks=[item.id])
    with api.state.db.read_session() as session:
        row = session.get(TaskAttempt, item.id)
        assert row is not None and row.heartbeat_at is not None


def test_a_heartbeat_cannot_keep_another_supervisors_work(api: ApiHarness) -> None:
    sess_a = api.supervisor_session("sup-a")
    sess_b = api.supervisor_session("sup-b")
    op = api.operator_session()
    api.define_workflow(sess_a, workflow("wf_o", task("t")))
    api.trigger_run(op, "wf_o")
    (item,) = api.claim(sess_a, ["task"])
    _age_claims(api, TIMEOUT)
    # sup-b naming sup-a's attempt neither refreshes it nor takes it back.
    _heartbeat(api, sess_b, tasks=[item.id])
    assert _state(api, item.id) == AttemptState.RUNNING
    _heartbeat(api, sess_a, tasks=[item.id])
    assert _state(api, item.id) == AttemptState.RUNNING


def test_a_parse_job_the_supervisor_does_not_hold_is_queued_again(api: ApiHarness) -> None:
    sess = api.supervisor_session("sup-a")
    resp = api.client.post(
        "/v1/supervisor/parse-jobs", json={"uri": "file:///workflows/x.py"}, headers=bearer(sess)
    )
    assert resp.status_code == 200, resp.text
    (job,) = api.claim(sess, ["parse"])
    _age_claims(api, TIMEOUT / 4 + 5)
    _heartbeat(api, sess, parse_jobs=[job.id])
    assert api.claim(sess, ["parse"]) == []  # still ours
    _heartbeat(api, sess)
    (again,) = api.claim(api.supervisor_session("sup-b"), ["parse"])
    assert again.id == job.id


def test_a_heartbeat_without_a_body_keeps_every_attempt(api: ApiHarness) -> None:
    """A supervisor from before reconciliation sends no body: nothing is taken back."""
    sess = api.supervisor_session("sup-a")
    op = api.operator_session()
    api.define_workflow(sess, workflow("wf_l", task("t")))
    api.trigger_run(op, "wf_l")
    (item,) = api.claim(sess, ["task"])
    _age_claims(api, TIMEOUT)
    resp = api.client.post("/v1/supervisor/heartbeat", headers=bearer(sess))
    assert resp.status_code == 200
    assert _state(api, item.id) == AttemptState.RUNNING
