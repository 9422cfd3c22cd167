"""Outcome reports are applied once; a repeat gets the original answer (real database, both
SQLite and PostgreSQL, through the app and its fast path).

A report whose answer is lost (a replica that died between commit and reply, a reset kept-alive
connection, a proxy's 503 after it passed the request on) is sent again by the sandbox. The
server must answer that repeat as it answered the first, not refuse it: a refusal makes the
sandbox give up, the supervisor report the attempt failed, and the task's code run again. Only
the very execution that made the report qualifies, and only with the same report.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from privsep.server.db import Database
from privsep.server.db.models import TaskAttempt, XCom

from .api import ApiHarness, Work, bearer, error_code, task, workflow

DEFER = {"trigger": {"module": "m", "qualname": "T"}}


@pytest.fixture
def api(db: Database, tmp_path: Path) -> Iterator[ApiHarness]:
    harness = ApiHarness(db, tmp_path)
    harness.register_supervisor("sup-a")
    yield harness
    harness.client.close()


def _claimed(api: ApiHarness, *tasks: dict[str, Any]) -> tuple[str, dict[str, Work]]:
    sess = api.supervisor_session("sup-a")
    api.define_workflow(sess, workflow("wf_rep", *tasks))
    api.trigger_run(api.operator_session(), "wf_rep")
    return sess, {w.body["task_id"]: w for w in api.claim(sess, ["task"])}


def _post(api: ApiHarness, work: Work, path: str, body: Any) -> Any:
    return api.client.post(path, json=body, headers=bearer(work.token))


@pytest.mark.parametrize(
    ("path", "body", "answer"),
    [
        ("/v1/task/succeed", {"return_value": 7}, "success"),
        ("/v1/task/fail", {"error": "boom"}, "failed"),
        ("/v1/task/retry", {"error": "again"}, "up_for_retry"),
        ("/v1/task/defer", DEFER, "deferred"),
    ],
)
def test_a_repeated_report_gets_the_first_answer_and_changes_nothing(
    api: ApiHarness, path: str, body: Any, answer: str
) -> None:
    _, items = _claimed(api, task("t", retries=1))
    work = items["t"]
    first = _post(api, work, path, body)
    assert first.status_code == 200, first.text
    assert first.json()["state"] == answer
    with api.state.db.read_session() as session:
        before = session.scalar(select(func.count()).select_from(TaskAttempt))
    for _ in range(2):
        again = _post(api, work, path, body)
        assert again.status_code == 200, again.text
        assert again.json() == first.json()
    with api.state.db.read_session() as session:
        # No second retry queued, no second trigger parked, the attempt as the first left it.
        assert session.scalar(select(func.count()).select_from(TaskAttempt)) == before
        row = session.get(TaskAttempt, work.id)
        assert row is not None and row.state.value == answer


def test_a_repeated_success_keeps_the_first_return_value(api: ApiHarness) -> None:
    _, items = _claimed(api, task("t"))
    work = items["t"]
    assert _post(api, work, "/v1/task/succeed", {"return_value": 1}).status_code == 200
    assert _post(api, work, "/v1/task/succeed", {"return_value": 2}).status_code == 200
    with api.state.db.read_session() as session:
        values = session.scalars(select(XCom.value).where(XCom.task_id == "t")).all()
        assert values == [1]


def test_another_report_after_the_first_is_refused(api: ApiHarness) -> None:
    _, items = _claimed(api, task("t", retries=1))
    work = items["t"]
    assert _post(api, work, "/v1/task/fail", {"error": "boom"}).status_code == 200
    for path, body in (("/v1/task/succeed", {}), ("/v1/task/defer", DEFER)):
        resp = _post(api, work, path, body)
        assert resp.status_code == 401 and error_code(resp) == "revoked", path


def test_a_report_of_an_earlier_execution_is_refused_after_a_new_claim(
    api: ApiHarness,
) -> None:
    """Deferred, then resumed: the first execution's defer is no longer this attempt's state,
    and its token cannot report for the new execution either."""
    sess, items = _claimed(api, task("t"))
    old = items["t"]
    assert _post(api, old, "/v1/task/defer", DEFER).status_code == 200
    with api.state.db.write_session() as session:  # the trigger fired: queued again
        row = session.get(TaskAttempt, old.id)
        assert row is not None
        row.state = row.state.__class__("queued")
        row.next_try_at = None
    (new,) = api.claim(sess, ["task"])
    assert new.id == old.id
    for path, body in (("/v1/task/defer", DEFER), ("/v1/task/succeed", {})):
        resp = _post(api, old, path, body)
        assert resp.status_code == 401 and error_code(resp) == "revoked", path
    assert _post(api, new, "/v1/task/succeed", {}).status_code == 200
    assert _post(api, new, "/v1/task/succeed", {}).status_code == 200
