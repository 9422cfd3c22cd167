"""The internal API against a real database (SQLite and PostgreSQL), with the real auth.

Every denial here goes through the same dependency the production routes use; none of it is
stubbed. Tokens used in attacks are forged with PyJWT and cryptography, as an attacker would.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import select, update

from privsep.secrets.keyring import key_id
from privsep.secrets.tokens import create_assertion
from privsep.server.db import Database
from privsep.server.db.models import AuditLog, Connection, Run, RunState, Supervisor

from .api import AUDIENCE, ApiHarness, Work, bearer, error_code, task, workflow


@pytest.fixture
def two_runs(api: ApiHarness) -> dict[str, Any]:
    """Two workflows, one run each, both first tasks claimed by sup-a."""
    sess = api.supervisor_session("sup-a")
    op = api.operator_session()
    api.define_workflow(sess, workflow("wf_a", task("a1"), task("a2", "a1")))
    api.define_workflow(sess, workflow("wf_b", task("b1")))
    run_a = api.trigger_run(op, "wf_a", {"x": 1})
    run_b = api.trigger_run(op, "wf_b")
    items = {w.body["task_id"]: w for w in api.claim(sess, ["task"])}
    return {"sess": sess, "op": op, "run_a": run_a, "run_b": run_b, **items}


def grant(api: ApiHarness, op: str, workflow_pattern: str, kind: str, name: str) -> None:
    resp = api.client.post(
        "/v1/operator/policy",
        json={"workflow_pattern": workflow_pattern, "kind": kind, "name_pattern": name},
        headers=bearer(op),
    )
    assert resp.status_code == 200, resp.text


# --- the happy path -------------------------------------------------------------------------


def test_a_run_flows_from_upstream_to_downstream(api: ApiHarness, two_runs: dict[str, Any]) -> None:
    a1: Work = two_runs["a1"]
    c = api.client
    ctx = c.get("/v1/task/context", headers=bearer(a1.token)).json()
    assert ctx["task_id"] == "a1" and ctx["params"] == {"x": 1} and ctx["try_number"] == 1
    assert c.put("/v1/task/xcoms/extra", json={"value": [1, 2]}, headers=bearer(a1.token)).json()
    resp = c.post("/v1/task/succeed", json={"return_value": {"rows": 3}}, headers=bearer(a1.token))
    assert resp.json() == {"state": "success"}
    # The downstream task is queued by the same transaction: claimable at once.
    (a2,) = api.claim(two_runs["sess"], ["task"])
    assert a2.body["task_id"] == "a2"
    pulled = c.get("/v1/task/xcoms/a1/return_value", headers=bearer(a2.token))
    assert pulled.json()["value"] == {"rows": 3}
    assert c.post("/v1/task/succeed", json={}, headers=bearer(a2.token)).status_code == 200
    with api.state.db.read_session() as session:
        assert session.get(Run, two_runs["run_a"]).state == RunState.SUCCESS  # type: ignore[union-attr]


def test_a_finished_attempts_tokens_leave_the_verified_token_cache(api: ApiHarness) -> None:
    """A report that ends an execution drops its tokens from the cache at once, rather than
    leaving them there for the rest of their lifetime (the server's memory grew by a token
    lifetime's worth of them); a live attempt's token stays cached."""
    sess = api.supervisor_session("sup-a")
    op = api.operator_session()
    api.define_workflow(sess, workflow("wf_cache", task("t1"), task("t2"), task("t3")))
    api.trigger_run(op, "wf_cache")
    a, b, c = api.claim(sess, ["task"], max_items=3)
    for work in (a, b, c):  # verified once each, so each is in the cache
        assert api.client.post("/v1/task/heartbeat", headers=bearer(work.token)).status_code == 200
    cache = api.state.token_cache
    cached = {claims.sub for claims in cache._entries.values()}
    assert {a.id, b.id, c.id} <= cached
    assert api.client.post("/v1/task/succeed", json={}, headers=bearer(a.token)).status_code == 200
    assert (
        api.client.post("/v1/task/retry", json={"error": "x"}, headers=bearer(b.token)).status_code
        == 200
    )
    cached = {claims.sub for claims in cache._entries.values()}
    assert a.id not in cached and b.id not in cached and c.id in cached


def test_retry_queues_a_new_try_and_failure_skips_downstream(api: ApiHarness) -> None:
    sess = api.supervisor_session("sup-a")
    op = api.operator_session()
    api.define_workflow(sess, workflow("wf_r", task("t", retries=1), task("after", "t")))
    run_id = api.trigger_run(op, "wf_r")
    (first,) = api.claim(sess, ["task"])
    assert api.client.post(
        "/v1/task/retry", json={"error": "boom"}, headers=bearer(first.token)
    ).json() == {"state": "up_for_retry"}
    (second,) = api.claim(sess, ["task"])
    assert second.body["try_number"] == 2
    assert api.client.post(
        "/v1/task/retry", json={"error": "boom"}, headers=bearer(second.token)
    ).json() == {"state": "failed"}
    resp = api.client.get(f"/v1/operator/runs/{run_id}/attempts", headers=bearer(op))
    states = sorted((a["task_id"], a["try_number"], a["state"]) for a in resp.json()["attempts"])
    assert states == [("after", 1, "upstream_failed"), ("t", 1, "up_for_retry"), ("t", 2, "failed")]


# --- authorization matrix ---------------------------------------------------------------------


def test_task_token_sees_only_its_own_run(api: ApiHarness, two_runs: dict[str, Any]) -> None:
    a1: Work = two_runs["a1"]
    b1: Work = two_runs["b1"]
    c = api.client
    assert (
        c.put(
            "/v1/task/xcoms/secret", json={"value": "b-only"}, headers=bearer(b1.token)
        ).status_code
        == 200
    )
    # a1 cannot read b1's XCom: XCom reads are scoped to the token's own run.
    resp = c.get("/v1/task/xcoms/b1/secret", headers=bearer(a1.token))
    assert resp.status_code == 404 and error_code(resp) == "not_found"
    # The same read from b1's own run works, so the 404 above is the scope, not a typo.
    assert c.get("/v1/task/xcoms/b1/secret", headers=bearer(b1.token)).status_code == 200
    # a1 writing "b1's" XCom writes its own; b1's value is untouched.
    c.put("/v1/task/xcoms/secret", json={"value": "forged"}, headers=bearer(a1.token))
    assert c.get("/v1/task/xcoms/b1/secret", headers=bearer(b1.token)).json()["value"] == "b-only"


def test_variables_and_connections_follow_operator_policy(
    api: ApiHarness, two_runs: dict[str, Any]
) -> None:
    op = two_runs["op"]
    a1: Work = two_runs["a1"]
    b1: Work = two_runs["b1"]
    c = api.client
    c.put("/v1/operator/variables/target", json={"value": "warehouse.t"}, headers=bearer(op))
    c.put(
        "/v1/operator/connections/warehouse",
        json={
            "conn_type": "postgres",
            "host": "db",
            "port": 5432,
            "login": "etl",
            "password": "s3cret",
            "schema": "public",
        },
        headers=bearer(op),
    )
    grant(api, op, "wf_a", "variable", "target")
    grant(api, op, "wf_a", "connection", "ware*")
    assert c.get("/v1/task/variables/target", headers=bearer(a1.token)).json()["value"] == (
        "warehouse.t"
    )
    conn = c.get("/v1/task/connections/warehouse", headers=bearer(a1.token)).json()
    assert conn["password"] == "s3cret" and conn["schema"] == "public"
    for path in ("/v1/task/variables/target", "/v1/task/connections/warehouse"):
        resp = c.get(path, headers=bearer(b1.token))
        assert resp.status_code == 403 and error_code(resp) == "not_granted", path
    resp = c.put("/v1/task/variables/target", json={"value": "x"}, headers=bearer(b1.token))
    assert resp.status_code == 403
    # The password is encrypted at rest.
    with api.state.db.read_session() as session:
        row = session.get(Connection, "warehouse")
        assert row is not None and row.password_encrypted and "s3cret" not in row.password_encrypted


def test_a_finished_attempts_token_is_dead(api: ApiHarness, two_runs: dict[str, Any]) -> None:
    a1: Work = two_runs["a1"]
    c = api.client
    assert c.post("/v1/task/succeed", json={}, headers=bearer(a1.token)).status_code == 200
    # A repeat of the report that ended it gets its answer (tests/server/test_report_repeats.py);
    # anything else the token asks is refused.
    for method, path, body in (
        ("GET", "/v1/task/context", None),
        ("POST", "/v1/task/heartbeat", {}),
        ("POST", "/v1/task/fail", {"error": "late"}),
        ("POST", "/v1/task/defer", {"trigger": {"module": "m", "qualname": "T"}}),
        ("PUT", "/v1/task/xcoms/late", {"value": 1}),
    ):
        resp = c.request(method, path, json=body, headers=bearer(a1.token))
        assert resp.status_code == 401 and error_code(resp) == "revoked", path
    resp = c.post(
        "/v1/supervisor/refresh",
        json={"kind": "task", "id": a1.id},
        headers=bearer(two_runs["sess"]),
    )
    assert resp.status_code == 409 and error_code(resp) == "not_running"


def test_only_the_claiming_supervisor_refreshes(api: ApiHarness, two_runs: dict[str, Any]) -> None:
    a1: Work = two_runs["a1"]
    other = api.supervisor_session("sup-b")
    resp = api.client.post(
        "/v1/supervisor/refresh", json={"kind": "task", "id": a1.id}, headers=bearer(other)
    )
    assert resp.status_code == 409 and error_code(resp) == "not_running"
    resp = api.client.post(
        "/v1/supervisor/refresh",
        json={"kind": "task", "id": a1.id},
        headers=bearer(two_runs["sess"]),
    )
    assert resp.status_code == 200
    fresh = resp.json()["token"]
    assert api.client.get("/v1/task/context", headers=bearer(fresh)).status_code == 200


def test_refresh_stops_at_the_lifetime_cap(db: Database, tmp_path: Path) -> None:
    api = ApiHarness(db, tmp_path, work_token_max_lifetime=1)
    api.register_supervisor("sup")
    sess = api.supervisor_session("sup")
    api.define_workflow(sess, workflow("wf", task("t")))
    api.trigger_run(api.operator_session(), "wf")
    (item,) = api.claim(sess, ["task"])
    time.sleep(1.2)
    resp = api.client.post(
        "/v1/supervisor/refresh", json={"kind": "task", "id": item.id}, headers=bearer(sess)
    )
    assert resp.status_code == 409 and error_code(resp) == "lifetime_exceeded"


def test_work_tokens_cannot_call_other_scopes(api: ApiHarness, two_runs: dict[str, Any]) -> None:
    a1: Work = two_runs["a1"]
    for method, path in (
        ("POST", "/v1/supervisor/claim"),
        ("GET", "/v1/operator/runs"),
        ("GET", "/v1/trigger/assigned"),
        ("POST", "/v1/parse/result"),
    ):
        resp = api.client.request(method, path, json={}, headers=bearer(a1.token))
        assert resp.status_code == 401 and error_code(resp) == "bad_scope", path
    resp = api.client.get("/v1/task/context", headers=bearer(two_runs["sess"]))
    assert resp.status_code == 401 and error_code(resp) == "bad_scope"


def test_trigger_token_touches_only_its_triggers(api: ApiHarness) -> None:
    sess = api.supervisor_session("sup-a")
    op = api.operator_session()
    api.define_workflow(sess, workflow("wf_d", task("wait"), task("other_wait")))
    api.trigger_run(op, "wf_d")
    w1, w2 = api.claim(sess, ["task"])
    trigger = {"module": "workflows.etl", "qualname": "Sleep", "kwargs": {"seconds": 1}}
    assert api.client.post(
        "/v1/task/defer", json={"trigger": trigger}, headers=bearer(w1.token)
    ).json() == {"state": "deferred"}
    (batch,) = api.claim(sess, ["trigger"])
    (trigger_id,) = batch.body["trigger_ids"]
    assigned = api.client.get("/v1/trigger/assigned", headers=bearer(batch.token)).json()
    assert [t["qualname"] for t in assigned["triggers"]] == ["Sleep"]
    # A second deferral creates a trigger this batch's token was not given.
    api.client.post("/v1/task/defer", json={"trigger": trigger}, headers=bearer(w2.token))
    (batch2,) = api.claim(sess, ["trigger"])
    (foreign,) = batch2.body["trigger_ids"]
    resp = api.client.post(
        f"/v1/trigger/{foreign}/event", json={"payload": 1}, headers=bearer(batch.token)
    )
    assert resp.status_code == 403
    resp = api.client.post(
        f"/v1/trigger/{trigger_id}/event",
        json={"payload": {"slept": 1}},
        headers=bearer(batch.token),
    )
    assert resp.status_code == 200
    # The deferred task is queued again with the event in its context.
    (resumed,) = api.claim(sess, ["task"])
    ctx = api.client.get("/v1/task/context", headers=bearer(resumed.token)).json()
    assert ctx["task_id"] == "wait" and ctx["trigger_event"] == {"payload": {"slept": 1}}


def test_a_parse_token_submits_only_its_own_job_once(api: ApiHarness) -> None:
    sess = api.supervisor_session("sup-a")
    api.client.post(
        "/v1/supervisor/parse-jobs", json={"uri": "file:///w/x.py"}, headers=bearer(sess)
    )
    (job,) = api.claim(sess, ["parse"])
    resp = api.client.post(
        "/v1/parse/result", json={"error": "SyntaxError: x"}, headers=bearer(job.token)
    )
    assert resp.status_code == 200
    resp = api.client.post("/v1/parse/result", json={"workflows": []}, headers=bearer(job.token))
    assert resp.status_code == 401 and error_code(resp) == "revoked"


def test_every_token_a_claim_issues_is_audited(api: ApiHarness) -> None:
    sess = api.supervisor_session("sup-a")
    op = api.operator_session()
    api.define_workflow(sess, workflow("wf_audit", task("x"), task("y")))
    api.trigger_run(op, "wf_audit")
    claimed = api.claim(sess, ["task"])
    with api.state.db.read_session() as session:
        rows = session.execute(
            select(AuditLog.subject, AuditLog.actor, AuditLog.detail).where(
                AuditLog.event == "token_issued", AuditLog.subject.in_([w.id for w in claimed])
            )
        ).all()
    assert len(claimed) == 2
    assert sorted(rows) == sorted((w.id, "sup-a", {"scope": "task"}) for w in claimed)


def test_a_deactivated_supervisors_session_is_refused_and_audited(api: ApiHarness) -> None:
    sess = api.supervisor_session("sup-a")
    assert api.claim(sess, ["task"]) == []
    with api.state.db.write_session() as session:
        session.execute(update(Supervisor).where(Supervisor.name == "sup-a").values(active=False))
    before = _denials(api)
    for path, body in (
        ("/v1/supervisor/claim", {"kinds": ["task"]}),
        ("/v1/supervisor/heartbeat", None),
    ):
        resp = api.client.post(path, json=body, headers=bearer(sess))
        assert resp.status_code == 401 and error_code(resp) == "revoked", path
    assert _denials(api) == before + 2


def _denials(api: ApiHarness) -> int:
    with api.state.db.read_session() as session:
        return len(
            session.scalars(select(AuditLog.id).where(AuditLog.event == "request_denied")).all()
        )


def test_a_cyclic_definition_is_refused(api: ApiHarness) -> None:
    sess = api.supervisor_session("sup-a")
    api.client.post(
        "/v1/supervisor/parse-jobs", json={"uri": "file:///w/c.py"}, headers=bearer(sess)
    )
    (job,) = api.claim(sess, ["parse"])
    resp = api.client.post(
        "/v1/parse/result",
        json={"workflows": [workflow("c", task("x", "y"), task("y", "x"))]},
        headers=bearer(job.token),
    )
    assert resp.status_code == 400 and error_code(resp) == "invalid_definition"


# --- JWT attacks ------------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _claims_of(token: str) -> dict[str, Any]:
    return jwt.decode(token, options={"verify_signature": False})


def _resign(api: ApiHarness, token: str, **changes: Any) -> str:
    payload = {**_claims_of(token), **changes}
    payload = {k: v for k, v in payload.items() if v is not None}
    signer = api.state.signer
    return jwt.encode(payload, signer.private_key, algorithm="EdDSA", headers={"kid": signer.kid})


@pytest.mark.parametrize(
    ("attack", "code"),
    [
        ("alg_none", "bad_algorithm"),
        ("hs256_with_public_key", "bad_algorithm"),
        ("wrong_audience", "bad_audience"),
        ("wrong_issuer", "bad_issuer"),
        ("missing_jti", "missing_claim"),
        ("missing_exp", "missing_claim"),
        ("expired", "expired"),
        ("not_yet_valid", "not_yet_valid"),
        ("foreign_key", "unknown_key"),
        ("garbage", "malformed"),
    ],
)
def test_forged_tokens_are_refused(
    api: ApiHarness, two_runs: dict[str, Any], attack: str, code: str
) -> None:
    real = two_runs["a1"].token
    claims = _claims_of(real)
    now = int(time.time())
    if attack == "alg_none":
        header = _b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
        forged = f"{header}.{_b64(json.dumps(claims).encode())}."
    elif attack == "hs256_with_public_key":
        pem = api.state.signer.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        header = _b64(json.dumps({"alg": "HS256", "kid": api.state.signer.kid}).encode())
        body = _b64(json.dumps(claims).encode())
        sig = hmac.new(pem, f"{header}.{body}".encode(), hashlib.sha256).digest()
        forged = f"{header}.{body}.{_b64(sig)}"
    elif attack == "wrong_audience":
        forged = _resign(api, real, aud="http://elsewhere")
    elif attack == "wrong_issuer":
        forged = _resign(api, real, iss="mallory")
    elif attack == "missing_jti":
        forged = _resign(api, real, jti=None)
    elif attack == "missing_exp":
        forged = _resign(api, real, exp=None)
    elif attack == "expired":
        forged = _resign(api, real, iat=now - 700, nbf=now - 700, exp=now - 100)
    elif attack == "not_yet_valid":
        forged = _resign(api, real, nbf=now + 600, exp=now + 1200)
    elif attack == "foreign_key":
        forged = jwt.encode(
            claims, Ed25519PrivateKey.generate(), algorithm="EdDSA", headers={"kid": "not-our-key"}
        )
    else:
        forged = "not.a.jwt"
    resp = api.client.get("/v1/task/context", headers=bearer(forged))
    assert resp.status_code == 401, resp.text
    assert error_code(resp) == code
    with api.state.db.read_session() as session:
        denied = session.scalars(select(AuditLog).where(AuditLog.event == "request_denied")).all()
        assert any(d.detail and d.detail.get("code") == code for d in denied)


def test_no_token_and_token_in_url_are_refused(api: ApiHarness, two_runs: dict[str, Any]) -> None:
    resp = api.client.get("/v1/task/context")
    assert resp.status_code == 401 and error_code(resp) == "missing_token"
    token = two_runs["a1"].token
    resp = api.client.get(f"/v1/task/context?access_token={token}", headers=bearer(token))
    assert resp.status_code == 400 and error_code(resp) == "token_in_url"
    resp = api.client.get(f"/v1/task/context?x={token}")
    assert resp.status_code == 400 and error_code(resp) == "token_in_url"


def test_assertions_are_single_use_and_short(api: ApiHarness) -> None:
    key = api.supervisors["sup-a"]
    assertion = create_assertion(key, supervisor_name="sup-a", audience=AUDIENCE)
    first = api.client.post("/v1/supervisor/session", json={"assertion": assertion})
    assert first.status_code == 200
    again = api.client.post("/v1/supervisor/session", json={"assertion": assertion})
    assert again.status_code == 401 and error_code(again) == "replayed"
    now = int(time.time())
    long_lived = jwt.encode(
        {
            "iss": "sup-a",
            "sub": "sup-a",
            "aud": AUDIENCE,
            "iat": now,
            "exp": now + 120,
            "jti": "x" * 16,
        },
        key,
        algorithm="EdDSA",
        headers={"kid": key_id(key.public_key())},
    )
    resp = api.client.post("/v1/supervisor/session", json={"assertion": long_lived})
    assert resp.status_code == 401 and error_code(resp) == "bad_lifetime"
    # Signed by sup-b's key but claiming to be sup-a: its kid is not sup-a's registered key.
    impostor = create_assertion(
        api.supervisors["sup-b"], supervisor_name="sup-a", audience=AUDIENCE
    )
    resp = api.client.post("/v1/supervisor/session", json={"assertion": impostor})
    assert resp.status_code == 401 and error_code(resp) == "unknown_key"
    wrong_aud = create_assertion(key, supervisor_name="sup-a", audience="http://other")
    resp = api.client.post("/v1/supervisor/session", json={"assertion": wrong_aud})
    assert resp.status_code == 401 and error_code(resp) == "bad_audience"


# --- the request surface ----------------------------------------------------------------------


def test_bodies_over_the_cap_get_413(db: Database, tmp_path: Path) -> None:
    api = ApiHarness(db, tmp_path, max_request_bytes=2048)
    big = {"assertion": "x" * 4096}
    resp = api.client.post("/v1/supervisor/session", json=big)
    assert resp.status_code == 413 and error_code(resp) == "too_large"


def test_request_models_are_strict(api: ApiHarness, two_runs: dict[str, Any]) -> None:
    sess = two_runs["sess"]
    resp = api.client.post("/v1/supervisor/claim", json={"max_items": "2"}, headers=bearer(sess))
    assert resp.status_code == 422 and error_code(resp) == "invalid_request"
    resp = api.client.post(
        "/v1/supervisor/claim", json={"max_items": 1, "as": "sup-b"}, headers=bearer(sess)
    )
    assert resp.status_code == 422


def test_openapi_declares_the_error_statuses(api: ApiHarness) -> None:
    op = api.operator_session()
    spec = api.client.get("/v1/operator/openapi.json", headers=bearer(op)).json()
    responses = spec["paths"]["/v1/task/succeed"]["post"]["responses"]
    assert {"400", "401", "403", "404", "409", "413", "422"} <= set(responses)
    assert all(p.startswith("/v1/") for p in spec["paths"])


def test_health_reports_database_and_heartbeats_to_an_operator(api: ApiHarness) -> None:
    api.supervisor_session("sup-a")  # opening a session counts as a heartbeat
    anonymous = api.client.get("/v1/health")
    assert anonymous.json() == {"status": "ok", "instance": api.state.keys.ring}
    assert "sup-a" not in anonymous.text
    body = api.client.get("/v1/health", headers=bearer(api.operator_session())).json()
    assert body["status"] == "ok" and body["database"] == "ok"
    ages = {s["name"]: s for s in body["supervisors"]}
    assert ages["sup-a"]["healthy"] and ages["sup-a"]["heartbeat_age_seconds"] < 60
    assert ages["sup-b"]["heartbeat_age_seconds"] is None and not ages["sup-b"]["healthy"]


def test_work_of_a_lost_supervisor_is_taken_back(api: ApiHarness) -> None:
    from datetime import timedelta

    from sqlalchemy import update

    from privsep.server.db.models import Supervisor, TaskAttempt, utcnow
    from privsep.server.reaper import reap_lost_work

    sess = api.supervisor_session("sup-a")
    op = api.operator_session()
    api.define_workflow(sess, workflow("wf_l", task("t", retries=1)))
    api.trigger_run(op, "wf_l")
    (item,) = api.claim(sess, ["task"])
    assert reap_lost_work(api.state.db, 60).attempts == 0  # sup-a is fresh: nothing to take
    with api.state.db.write_session() as session:
        session.execute(
            update(Supervisor)
            .where(Supervisor.name == "sup-a")
            .values(last_heartbeat_at=utcnow() - timedelta(seconds=120))
        )
    assert reap_lost_work(api.state.db, 60).attempts == 1
    assert reap_lost_work(api.state.db, 60).attempts == 0  # a second replica's pass: no-op
    with api.state.db.read_session() as session:
        old = session.get(TaskAttempt, item.id)
        assert old is not None and old.state.value == "up_for_retry"
    # The old token is dead; the retry is claimable by anyone.
    resp = api.client.get("/v1/task/context", headers=bearer(item.token))
    assert resp.status_code == 401 and error_code(resp) == "revoked"
    (retry,) = api.claim(api.supervisor_session("sup-b"), ["task"])
    assert retry.body["try_number"] == 2


def test_a_restarted_supervisor_ends_what_its_previous_process_ran(api: ApiHarness) -> None:
    sess = api.supervisor_session("sup-a")
    op = api.operator_session()
    api.define_workflow(sess, workflow("wf_x", task("t")))
    run_id = api.trigger_run(op, "wf_x")
    (item,) = api.claim(sess, ["task"])
    fresh = api.supervisor_session("sup-a")  # the new process opens a new session
    assert api.client.post("/v1/supervisor/restarted", headers=bearer(fresh)).status_code == 200
    resp = api.client.get(f"/v1/operator/runs/{run_id}/attempts", headers=bearer(op))
    assert [a["state"] for a in resp.json()["attempts"]] == ["failed"]
    assert api.client.get("/v1/task/context", headers=bearer(item.token)).status_code == 401


def test_trigger_batches_never_mix_workflows(api: ApiHarness) -> None:
    sess = api.supervisor_session("sup-a")
    op = api.operator_session()
    trigger = {"module": "workflows.etl", "qualname": "Sleep", "kwargs": {"seconds": 1}}
    for wf in ("wf_t1", "wf_t2"):
        api.define_workflow(sess, workflow(wf, task("wait")))
        api.trigger_run(op, wf)
    for item in api.claim(sess, ["task"]):
        api.client.post("/v1/task/defer", json={"trigger": trigger}, headers=bearer(item.token))
    first = api.claim(sess, ["trigger"])
    second = api.claim(sess, ["trigger"])
    assert len(first) == 1 and len(second) == 1
    assert len(first[0].body["trigger_ids"]) == 1 and len(second[0].body["trigger_ids"]) == 1
    assert first[0].body["source_uris"] != second[0].body["source_uris"]
