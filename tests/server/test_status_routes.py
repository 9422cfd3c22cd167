"""The operator's read-only status routes that ``runner ui`` shows: supervisors with their
heartbeat and what their discovery last said, and the audit log's refusals. Called against
the real application on SQLite and PostgreSQL (the ``db`` fixture), with real sessions."""

from __future__ import annotations

from .api import ApiHarness, bearer, error_code


def supervisors(api: ApiHarness) -> dict[str, dict[str, object]]:
    resp = api.client.get("/v1/operator/supervisors", headers=bearer(api.operator_session()))
    assert resp.status_code == 200, resp.text
    return {s["name"]: s for s in resp.json()["supervisors"]}


def heartbeat(api: ApiHarness, sess: str, body: object) -> int:
    return api.client.post("/v1/supervisor/heartbeat", json=body, headers=bearer(sess)).status_code


def test_a_heartbeat_says_what_discovery_does_and_an_operator_reads_it(api: ApiHarness) -> None:
    sess = api.supervisor_session("sup-a")
    assert supervisors(api)["sup-a"]["discovery_state"] is None  # said nothing yet

    failing = {"state": "failing", "error": "manifest.json: line 3: Expecting ','"}
    assert heartbeat(api, sess, {"discovery": failing}) == 200
    seen = supervisors(api)
    assert seen["sup-a"]["discovery_state"] == "failing"
    assert seen["sup-a"]["discovery_error"] == failing["error"]
    assert seen["sup-a"]["discovery_at"] and seen["sup-a"]["last_heartbeat_at"]
    assert seen["sup-b"]["discovery_state"] is None and seen["sup-b"]["last_heartbeat_at"] is None

    # A heartbeat that says nothing of discovery (an older supervisor) leaves the last word.
    assert heartbeat(api, sess, {}) == 200
    assert supervisors(api)["sup-a"]["discovery_state"] == "failing"
    assert heartbeat(api, sess, {"discovery": {"state": "up_to_date"}}) == 200
    seen = supervisors(api)["sup-a"]
    assert (seen["discovery_state"], seen["discovery_error"]) == ("up_to_date", None)
    # Only the states the page knows: anything else is the supervisor's bug, refused.
    assert heartbeat(api, sess, {"discovery": {"state": "<script>"}}) == 422


def test_the_status_routes_are_for_operators_only(api: ApiHarness) -> None:
    sess = api.supervisor_session("sup-a")
    for path in ("/v1/operator/supervisors", "/v1/operator/audit"):
        assert api.client.get(path).status_code == 401, path
        resp = api.client.get(path, headers=bearer(sess))
        assert resp.status_code == 401 and error_code(resp) == "bad_scope", path


def test_the_audit_route_lists_refusals_newest_first(api: ApiHarness) -> None:
    sess = api.supervisor_session("sup-a")
    api.client.get("/v1/operator/runs", headers=bearer(sess))  # refused: bad_scope
    api.client.get("/v1/operator/workflows")  # refused: no token
    op = api.operator_session()
    resp = api.client.get(
        "/v1/operator/audit", params={"event": "request_denied"}, headers=bearer(op)
    )
    assert resp.status_code == 200, resp.text
    entries = resp.json()["entries"]
    assert {e["event"] for e in entries} == {"request_denied"}
    paths = [e["detail"]["path"] for e in entries]
    assert paths.index("/v1/operator/workflows") < paths.index("/v1/operator/runs")
    assert entries[paths.index("/v1/operator/runs")]["detail"]["code"] == "bad_scope"
    everything = api.client.get("/v1/operator/audit", params={"limit": 1000}, headers=bearer(op))
    assert "session_opened" in {e["event"] for e in everything.json()["entries"]}
    one = api.client.get("/v1/operator/audit", params={"limit": 1}, headers=bearer(op))
    assert len(one.json()["entries"]) == 1
