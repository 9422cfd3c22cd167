"""The task fast path (privsep.server.fastpath) answers exactly what the FastAPI routes answer.

Each check sends the same request twice: the first time the token is new to this server, so
the fast path passes it on and FastAPI's route verifies it (and fills the verified-token
cache); the second time the fast path answers. Both answers must be byte-identical. Refusals
must always come from the route, with their audit record. Real database, real auth, on SQLite
and PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from privsep.server.app import serving_app
from privsep.server.db import Database
from privsep.server.db.models import AuditLog
from privsep.server.fastpath import TaskFastPath

from .api import ApiHarness, Work, bearer, error_code, task, workflow


def fast_path_of(api: ApiHarness) -> TaskFastPath:
    served: Any = getattr(api, "served_app", None)
    if isinstance(served, TaskFastPath):
        return served
    api.client.get("/v1/jwks")  # builds the middleware stack
    app: Any = api.app.middleware_stack
    while app is not None and not isinstance(app, TaskFastPath):
        app = getattr(app, "app", None)
    assert isinstance(app, TaskFastPath)
    return app


def denials(api: ApiHarness) -> int:
    with api.state.db.read_session() as session:
        return int(
            session.scalar(
                select(func.count()).select_from(AuditLog).where(AuditLog.event == "request_denied")
            )
            or 0
        )


@pytest.fixture(params=["create_app", "serving_app"])
def api(request: pytest.FixtureRequest, db: Database, tmp_path: Path) -> Iterator[ApiHarness]:
    """The app as tests build it (the fast path inside, as a middleware) and as ``runner
    server`` runs it (the fast path in front of the application)."""
    harness = ApiHarness(db, tmp_path)
    if request.param == "serving_app":
        harness.client.close()
        harness.served_app = serving_app(harness.state)  # type: ignore[attr-defined]
        harness.client = TestClient(harness.served_app, raise_server_exceptions=True)  # type: ignore[attr-defined]
    harness.register_supervisor("sup")
    yield harness
    harness.client.close()


@pytest.fixture
def running(api: ApiHarness) -> dict[str, Any]:
    """Two running tasks of two workflows; wf_a is granted variable ``target``."""
    sess = api.supervisor_session("sup")
    op = api.operator_session()
    api.define_workflow(sess, workflow("wf_a", task("a1")))
    api.define_workflow(sess, workflow("wf_b", task("b1")))
    api.trigger_run(op, "wf_a")
    api.trigger_run(op, "wf_b")
    items = {w.body["task_id"]: w for w in api.claim(sess, ["task"])}
    c = api.client
    assert c.put(
        "/v1/operator/variables/target", json={"value": "wärehouse\u2028t"}, headers=bearer(op)
    ).is_success
    assert c.post(
        "/v1/operator/policy",
        json={"workflow_pattern": "wf_a", "kind": "variable", "name_pattern": "tar*"},
        headers=bearer(op),
    ).is_success
    return {"op": op, **items}


def twice(api: ApiHarness, method: str, path: str, token: str) -> tuple[Any, Any]:
    first = api.client.request(method, path, headers=bearer(token))
    second = api.client.request(method, path, headers=bearer(token))
    return first, second


def same(first: Any, second: Any) -> None:
    assert first.status_code == second.status_code
    assert first.content == second.content
    assert first.headers["content-type"] == second.headers["content-type"]
    assert first.headers["content-length"] == second.headers["content-length"]


def test_variable_xcom_and_heartbeat_answers_match_the_routes(
    api: ApiHarness, running: dict[str, Any]
) -> None:
    a1: Work = running["a1"]
    fast = fast_path_of(api)
    first, second = twice(api, "GET", "/v1/task/variables/target", a1.token)
    assert first.status_code == 200 and first.json() == {
        "key": "target",
        "value": "wärehouse\u2028t",
    }
    same(first, second)
    assert fast.served == 1

    for value in ({"rows": [1, 2.5, None, "é"]}, 5, 1.5, "5", None, [], 10**20):
        assert api.client.put(
            "/v1/task/xcoms/out", json={"value": value}, headers=bearer(a1.token)
        ).is_success
        served = fast.served
        answered = api.client.get("/v1/task/xcoms/a1/out", headers=bearer(a1.token))
        assert fast.served == served + 1  # the token is cached by now: the fast path answers
        # Any query string makes the fast path pass the request on: the route's own answer.
        routed = api.client.get("/v1/task/xcoms/a1/out?x=1", headers=bearer(a1.token))
        assert fast.served == served + 1
        assert answered.status_code == 200 and answered.json()["value"] == value, value
        same(answered, routed)

    before = fast.served
    first, second = twice(api, "POST", "/v1/task/heartbeat", a1.token)
    assert first.status_code == 200 and first.content == b'{"ok":true}'
    same(first, second)
    assert fast.served == before + 2


def test_refusals_come_from_the_routes_and_are_audited(
    api: ApiHarness, running: dict[str, Any]
) -> None:
    a1: Work = running["a1"]
    b1: Work = running["b1"]
    c = api.client
    fast = fast_path_of(api)
    assert c.get("/v1/task/variables/target", headers=bearer(a1.token)).status_code == 200
    assert c.get("/v1/task/variables/target", headers=bearer(b1.token)).status_code == 403
    served = fast.served

    # Not granted: 403, audited, every time.
    audited = denials(api)
    for _ in range(2):
        resp = c.get("/v1/task/variables/target", headers=bearer(b1.token))
        assert resp.status_code == 403 and error_code(resp) == "not_granted"
    assert denials(api) == audited + 2

    # Granted but missing: 404, not a security event.
    resp = c.get("/v1/task/variables/tarmac", headers=bearer(a1.token))
    assert resp.status_code == 404 and error_code(resp) == "not_found"
    resp = c.get("/v1/task/xcoms/a1/nothing", headers=bearer(a1.token))
    assert resp.status_code == 404 and error_code(resp) == "not_found"
    assert denials(api) == audited + 2

    # A token in the URL is refused even though the header holds a good one.
    resp = c.get(f"/v1/task/variables/target?token={a1.token}", headers=bearer(a1.token))
    assert resp.status_code == 400 and error_code(resp) == "token_in_url"
    # A malformed header.
    resp = c.get("/v1/task/variables/target", headers={"Authorization": f"Basic {a1.token}"})
    assert resp.status_code == 401 and error_code(resp) == "malformed"
    assert fast.served == served

    # Once the attempt is over, its cached token is dead on every fast route.
    assert c.post("/v1/task/succeed", json={}, headers=bearer(a1.token)).status_code == 200
    audited = denials(api)
    for method, path in (
        ("GET", "/v1/task/variables/target"),
        ("GET", "/v1/task/xcoms/a1/return_value"),
        ("POST", "/v1/task/heartbeat"),
    ):
        resp = c.request(method, path, headers=bearer(a1.token))
        assert resp.status_code == 401 and error_code(resp) == "revoked", path
    assert denials(api) == audited + 3
    assert fast.served == served
