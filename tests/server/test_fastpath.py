"""The task fast path (privsep.server.fastpath) answers exactly what the FastAPI routes answer.

Each check sends the same request twice: once as is, which the fast path answers (it verifies
a token it has not seen itself), and once with a query string, which makes it pass the request
on to FastAPI's route. Both answers must be byte-identical. Refusals must always come from the
route, with their audit record. Real database, real auth, on SQLite and PostgreSQL.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi.testclient import TestClient
from sqlalchemy import func, select, update

from privsep.server.app import serving_app
from privsep.server.db import Database
from privsep.server.db.models import AuditLog, ParseError, ParseJob, Supervisor, WorkflowVersion
from privsep.server.fastpath import MAX_FAST_BODY, TaskFastPath

from .api import ApiHarness, Work, bearer, error_code, task, workflow


def fast_path_of(api: ApiHarness) -> TaskFastPath:
    app: Any = getattr(api, "served_app", None)  # the request metrics, then the fast path
    if app is None:
        api.client.get("/v1/jwks")  # builds the middleware stack
        app = api.app.middleware_stack
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
    """The fast path's answer, then the route's (a query string makes the fast path pass)."""
    fast = fast_path_of(api)
    served = fast.served
    first = api.client.request(method, path, headers=bearer(token))
    assert fast.served == served + 1, f"the fast path did not answer {method} {path}"
    second = api.client.request(method, f"{path}?x=1", headers=bearer(token))
    assert fast.served == served + 1, f"the fast path answered {method} {path}?x=1"
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

    first, second = twice(api, "POST", "/v1/task/heartbeat", a1.token)
    assert first.status_code == 200 and first.content == b'{"ok":true}'
    same(first, second)


def test_context_answers_match_the_route(api: ApiHarness) -> None:
    sess = api.supervisor_session("sup")
    op = api.operator_session()
    api.define_workflow(sess, workflow("wf_c", task("c1")))
    api.trigger_run(op, "wf_c", {"n": 5, "name": "wärehouse\u2028", "nested": [1.5, None]})
    (c1,) = api.claim(sess, ["task"])
    first, second = twice(api, "GET", "/v1/task/context", c1.token)
    assert first.status_code == 200
    body = first.json()
    assert body["params"] == {"n": 5, "name": "wärehouse\u2028", "nested": [1.5, None]}
    assert body["task_id"] == "c1" and body["try_number"] == 1 and body["trigger_event"] is None
    same(first, second)


def test_success_through_the_fast_path_is_the_routes_success(api: ApiHarness) -> None:
    """Two identical attempts end the same way, one through each path: same answer, same
    stored return value, same downstream queued."""
    sess = api.supervisor_session("sup")
    op = api.operator_session()
    api.define_workflow(sess, workflow("wf_s", task("s1"), task("s2", "s1")))
    api.trigger_run(op, "wf_s")
    api.trigger_run(op, "wf_s")
    first_run, second_run = api.claim(sess, ["task"])
    fast = fast_path_of(api)
    value = {"rows": [1, 2.5, None, "é"], "big": 10**20}
    served = fast.served
    by_fast = api.client.post(
        "/v1/task/succeed", json={"return_value": value}, headers=bearer(first_run.token)
    )
    assert fast.served == served + 1
    by_route = api.client.post(
        "/v1/task/succeed?x=1", json={"return_value": value}, headers=bearer(second_run.token)
    )
    assert fast.served == served + 1
    same(by_fast, by_route)
    assert by_fast.json() == {"state": "success"}
    downstream = api.claim(sess, ["task"])
    assert sorted(w.body["task_id"] for w in downstream) == ["s2", "s2"]
    for work in downstream:
        pulled = api.client.get("/v1/task/xcoms/s1/return_value", headers=bearer(work.token))
        assert pulled.json()["value"] == value


def test_success_bodies_the_fast_path_does_not_take_reach_the_route_whole(
    api: ApiHarness,
) -> None:
    sess = api.supervisor_session("sup")
    op = api.operator_session()
    api.define_workflow(sess, workflow("wf_b", task("b1")))
    for _ in range(2):
        api.trigger_run(op, "wf_b")
    small, large = api.claim(sess, ["task"])
    fast = fast_path_of(api)
    served = fast.served
    c = api.client
    # Read by the fast path, refused by its validation, replayed to the route: the route's
    # 422 names the extra field, so it saw the very body.
    resp = c.post(
        "/v1/task/succeed", json={"return_value": 1, "surprise": 2}, headers=bearer(small.token)
    )
    assert resp.status_code == 422 and "surprise" in resp.text
    # Not JSON by its content type: passed on unread.
    resp = c.post(
        "/v1/task/succeed",
        content=b'{"return_value": 1}',
        headers={**bearer(small.token), "Content-Type": "text/plain"},
    )
    assert resp.status_code != 200 or resp.json() == {"state": "success"}
    assert fast.served == served
    # Larger than the fast path reads: passed on unread, and the route stores all of it.
    big = "x" * (MAX_FAST_BODY + 10)
    resp = c.post("/v1/task/succeed", json={"return_value": big}, headers=bearer(large.token))
    assert resp.status_code == 200 and resp.json() == {"state": "success"}
    assert fast.served == served


def test_a_token_that_does_not_verify_is_refused_by_the_route(
    api: ApiHarness, running: dict[str, Any]
) -> None:
    a1: Work = running["a1"]
    fast = fast_path_of(api)
    served = fast.served
    head, payload, signature = a1.token.split(".")
    forged = f"{head}.{payload}.{signature[:-4]}AAAA"
    audited = denials(api)
    for method, path in (("GET", "/v1/task/context"), ("POST", "/v1/task/succeed")):
        resp = api.client.request(method, path, json={}, headers=bearer(forged))
        assert resp.status_code == 401, (path, resp.text)
    assert denials(api) == audited + 2
    assert fast.served == served
    # The genuine token still works, through the fast path.
    assert api.client.get("/v1/task/context", headers=bearer(a1.token)).status_code == 200
    assert fast.served == served + 1


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
    assert fast.served == served + 1  # the success itself took the fast path
    served = fast.served
    audited = denials(api)
    for method, path in (
        ("GET", "/v1/task/context"),
        ("GET", "/v1/task/variables/target"),
        ("GET", "/v1/task/xcoms/a1/return_value"),
        ("POST", "/v1/task/heartbeat"),
    ):
        resp = c.request(method, path, headers=bearer(a1.token))
        assert resp.status_code == 401 and error_code(resp) == "revoked", path
    assert denials(api) == audited + 4
    assert fast.served == served
    # A repeat of the report that ended the attempt gets the first answer, on the fast path
    # too (a report whose reply was lost is sent again); it changes nothing.
    resp = c.post("/v1/task/succeed", json={}, headers=bearer(a1.token))
    assert resp.status_code == 200 and resp.json() == {"state": "success"}
    assert denials(api) == audited + 4


def test_claims_through_the_fast_path_match_the_routes(api: ApiHarness) -> None:
    sess = api.supervisor_session("sup")
    op = api.operator_session()
    fast = fast_path_of(api)
    c = api.client
    body = {"kinds": ["task", "parse", "trigger"], "max_items": 1}
    # Nothing to claim: byte-identical answers.
    first = c.post("/v1/supervisor/claim", json=body, headers=bearer(sess))
    second = c.post("/v1/supervisor/claim?x=1", json=body, headers=bearer(sess))
    same(first, second)
    assert first.json() == {"items": []}

    api.define_workflow(sess, workflow("wf_k", task("k1")))
    api.trigger_run(op, "wf_k", {"n": 1})
    api.trigger_run(op, "wf_k", {"n": 1})
    served = fast.served
    by_fast = c.post("/v1/supervisor/claim", json=body, headers=bearer(sess))
    assert fast.served == served + 1
    by_route = c.post("/v1/supervisor/claim?x=1", json=body, headers=bearer(sess))
    assert fast.served == served + 1
    assert by_fast.status_code == by_route.status_code == 200
    (one,), (other,) = by_fast.json()["items"], by_route.json()["items"]
    differ = {"id", "token", "expires_at", "run_id"}
    assert one.keys() == other.keys()
    assert {k: v for k, v in one.items() if k not in differ} == {
        k: v for k, v in other.items() if k not in differ
    }
    assert one["id"] != other["id"]
    # The token the fast path issued is a working task token, and it was audited.
    ctx = c.get("/v1/task/context", headers=bearer(one["token"]))
    assert ctx.status_code == 200 and ctx.json()["attempt_id"] == one["id"]
    with api.state.db.read_session() as session:
        issued = session.scalars(
            select(AuditLog.subject).where(AuditLog.event == "token_issued")
        ).all()
    assert one["id"] in issued and other["id"] in issued


def test_claims_the_fast_path_must_not_answer_go_to_the_route(api: ApiHarness) -> None:
    sess = api.supervisor_session("sup")
    fast = fast_path_of(api)
    c = api.client
    served = fast.served
    # A body the route refuses (read by the fast path and replayed: the 422 names the field).
    resp = c.post(
        "/v1/supervisor/claim", json={"kinds": ["task"], "surprise": 1}, headers=bearer(sess)
    )
    assert resp.status_code == 422 and "surprise" in resp.text
    # A task token is not a supervisor token.
    op = api.operator_session()
    api.define_workflow(sess, workflow("wf_t", task("t1")))
    api.trigger_run(op, "wf_t")
    (work,) = api.claim(sess, ["task"])
    served = fast.served
    audited = denials(api)
    resp = c.post("/v1/supervisor/claim", json={"kinds": ["task"]}, headers=bearer(work.token))
    assert resp.status_code == 401
    # A deactivated supervisor: refused and audited by the route.
    with api.state.db.write_session() as session:
        session.execute(update(Supervisor).where(Supervisor.name == "sup").values(active=False))
    resp = c.post("/v1/supervisor/claim", json={"kinds": ["task"]}, headers=bearer(sess))
    assert resp.status_code == 401 and error_code(resp) == "revoked"
    assert denials(api) == audited + 2
    assert fast.served == served


# --- parse results ----------------------------------------------------------------------------


def parse_job(api: ApiHarness, sess: str, uri: str) -> Work:
    resp = api.client.post("/v1/supervisor/parse-jobs", json={"uri": uri}, headers=bearer(sess))
    assert resp.status_code == 200, resp.text
    (job,) = api.claim(sess, ["parse"], 1)
    assert job.id == resp.json()["id"]
    return job


def stored(api: ApiHarness, job_id: str) -> tuple[str, int, int]:
    """The job's state, and how many versions and parse errors are stored in all."""
    with api.state.db.read_session() as session:
        state = session.scalar(select(ParseJob.state).where(ParseJob.id == job_id))
        versions = session.scalar(select(func.count()).select_from(WorkflowVersion))
        errors = session.scalar(select(func.count()).select_from(ParseError))
    return str(state), int(versions or 0), int(errors or 0)


def test_parse_results_through_the_fast_path_are_the_routes(api: ApiHarness) -> None:
    sess = api.supervisor_session("sup")
    fast = fast_path_of(api)
    # The same file twice, its contents changed in between (another file declaring the same
    # workflow would be refused: the first file keeps the id).
    first = parse_job(api, sess, "file:///w/p1.py")
    second = parse_job(api, sess, "file:///w/p1.py#sha256=" + "1" * 64)
    served = fast.served
    definition = {"workflows": [workflow("wf_p", task("p1"), task("p2", "p1", retries=2))]}
    by_fast = api.client.post("/v1/parse/result", json=definition, headers=bearer(first.token))
    assert fast.served == served + 1
    by_route = api.client.post(
        "/v1/parse/result?x=1", json=definition, headers=bearer(second.token)
    )
    assert fast.served == served + 1
    same(by_fast, by_route)
    assert by_fast.json() == {"ok": True}
    assert stored(api, first.id) == stored(api, second.id) == ("success", 2, 0)
    # A parse error takes the fast path too.
    failing = parse_job(api, sess, "file:///w/p3.py")
    served = fast.served
    resp = api.client.post(
        "/v1/parse/result", json={"error": "boom"}, headers=bearer(failing.token)
    )
    assert resp.json() == {"ok": True} and fast.served == served + 1
    assert stored(api, failing.id) == ("failed", 2, 1)


def test_parse_results_the_fast_path_must_not_answer_go_to_the_route(api: ApiHarness) -> None:
    """Forged and foreign tokens, a job that is over or is another supervisor's now, bodies
    the route refuses: each is refused by the route, with its audit record, and writes
    nothing."""
    sess = api.supervisor_session("sup")
    fast = fast_path_of(api)
    c = api.client
    job = parse_job(api, sess, "file:///w/target.py")
    body = {"workflows": [workflow("wf_target", task("t1"))]}
    served, audited = fast.served, denials(api)
    head, payload, signature = job.token.split(".")
    forged = {
        "bad signature": f"{head}.{payload}.{signature[:-4]}AAAA",
        "foreign key": jwt.encode(
            jwt.decode(job.token, options={"verify_signature": False}),
            Ed25519PrivateKey.generate(),
            algorithm="EdDSA",
            headers={"kid": api.state.signer.kid},
        ),
        "supervisor token": sess,
    }
    for name, token in forged.items():
        resp = c.post("/v1/parse/result", json=body, headers=bearer(token))
        assert resp.status_code == 401, (name, resp.text)
    assert denials(api) == audited + len(forged)
    # A token in the URL, even with the genuine token in the header.
    resp = c.post(f"/v1/parse/result?token={job.token}", json=body, headers=bearer(job.token))
    assert resp.status_code == 400 and error_code(resp) == "token_in_url"
    # Bodies the fast path read and refused reach the route whole: its answers show it.
    resp = c.post(
        "/v1/parse/result",
        json={"workflows": [workflow("wf_cycle", task("x", "y"), task("y", "x"))]},
        headers=bearer(job.token),
    )
    assert resp.status_code == 400 and error_code(resp) == "invalid_definition"
    resp = c.post("/v1/parse/result", json={**body, "surprise": 1}, headers=bearer(job.token))
    assert resp.status_code == 422 and "surprise" in resp.text
    resp = c.post(
        "/v1/parse/result",
        content=b'{"workflows": [], "workflows": "x"}',
        headers={**bearer(job.token), "Content-Type": "application/json"},
    )
    assert resp.status_code == 422
    assert fast.served == served
    assert stored(api, job.id) == ("running", 0, 0)

    # Its supervisor restarted: the job went back to the queue and another supervisor runs
    # it now. The old token names the old supervisor: refused, the new run untouched.
    api.register_supervisor("sup-b")
    assert c.post("/v1/supervisor/restarted", headers=bearer(sess)).status_code == 200
    (again,) = api.claim(api.supervisor_session("sup-b"), ["parse"])
    assert again.id == job.id
    served, audited = fast.served, denials(api)
    resp = c.post("/v1/parse/result", json=body, headers=bearer(job.token))
    assert resp.status_code == 401 and error_code(resp) == "revoked"
    assert denials(api) == audited + 1
    assert stored(api, job.id) == ("running", 0, 0)
    assert fast.served == served

    # The new token works once, through the fast path; sent again, the route refuses it.
    assert c.post("/v1/parse/result", json=body, headers=bearer(again.token)).json() == {"ok": True}
    assert fast.served == served + 1
    resp = c.post("/v1/parse/result", json=body, headers=bearer(again.token))
    assert resp.status_code == 401 and error_code(resp) == "revoked"
    assert denials(api) == audited + 2
    assert stored(api, job.id) == ("success", 1, 0)
    assert fast.served == served + 1


def test_parse_results_larger_than_the_fast_path_reads_are_stored_by_the_route(
    api: ApiHarness,
) -> None:
    sess = api.supervisor_session("sup")
    fast = fast_path_of(api)
    job = parse_job(api, sess, "file:///w/big.py")
    tasks = [task(f"t{n:05d}") for n in range(1200)]
    body = {"workflows": [workflow("wf_big", *tasks)]}
    assert len(json.dumps(body)) > MAX_FAST_BODY
    served = fast.served
    resp = api.client.post("/v1/parse/result", json=body, headers=bearer(job.token))
    assert resp.status_code == 200 and resp.json() == {"ok": True}
    assert fast.served == served
    assert stored(api, job.id) == ("success", 1, 0)
