"""The operator's view of the server: its metrics and its API document, through the real
application with real keys. Both answer an operator session and nothing else: no anonymous
caller, no sandbox token, no supervisor session."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from privsep.server.app import serving_app
from privsep.server.db import Database

from .api import ApiHarness, bearer, task, workflow


@pytest.fixture(params=["create_app", "serving_app"])
def api(request: pytest.FixtureRequest, db: Database, tmp_path: Path) -> Iterator[ApiHarness]:
    """The app as tests build it and as ``runner server`` runs it (the request metrics and
    the fast path in front of the application)."""
    harness = ApiHarness(db, tmp_path)
    if request.param == "serving_app":
        harness.client.close()
        harness.client = TestClient(serving_app(harness.state), raise_server_exceptions=True)  # type: ignore[arg-type]
    yield harness
    harness.client.close()


def scrape(api: ApiHarness, op: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the operator's scrape, by name and labels."""
    resp = api.client.get("/v1/operator/metrics", headers=bearer(op))
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("text/plain; version=0.0.4")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(resp.text)
        for s in family.samples
    }


def value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_and_the_document_refuse_everyone_but_an_operator(api: ApiHarness) -> None:
    api.register_supervisor("sup")
    sess = api.supervisor_session("sup")
    op = api.operator_session()
    api.define_workflow(sess, workflow("wf", task("t")))
    api.trigger_run(op, "wf")
    (work,) = api.claim(sess, ["task"])
    for path in ("/v1/operator/metrics", "/v1/operator/openapi.json"):
        assert api.client.get(path).status_code == 401
        for token in (work.token, sess):  # a sandbox's token, a supervisor's session
            resp = api.client.get(path, headers=bearer(token))
            assert resp.status_code == 401, (path, resp.text)
        assert api.client.get(path, headers=bearer(op)).status_code == 200
    # FastAPI's own unauthenticated document and pages are off.
    for path in ("/openapi.json", "/v1/openapi.json", "/docs", "/redoc"):
        assert api.client.get(path).status_code == 404


def test_counters_move_with_claims_tokens_refusals_and_requests(api: ApiHarness) -> None:
    api.register_supervisor("sup")
    sess = api.supervisor_session("sup")
    op = api.operator_session()
    before = scrape(api, op)
    api.define_workflow(sess, workflow("wf", task("t")))
    api.trigger_run(op, "wf")
    (work,) = api.claim(sess, ["task"])
    assert api.client.get("/v1/task/context", headers=bearer(work.token)).status_code == 200
    assert api.client.get("/v1/operator/runs").status_code == 401  # no token: refused
    assert api.client.get("/v1/no/such/path/123").status_code == 404
    after = scrape(api, op)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("privsep_server_claimed_items_total", kind="task") == 1
    assert moved("privsep_server_claimed_items_total", kind="parse") == 1
    assert moved("privsep_server_tokens_issued_total", scope="task") == 1
    assert moved("privsep_server_tokens_issued_total", scope="parse") == 1
    assert moved("privsep_server_refusals_total", code="missing_token") == 1
    # Request latency under route templates, never raw paths; the fast path's answers too.
    assert moved("privsep_server_request_duration_seconds_count", route="GET /v1/task/context")
    assert moved("privsep_server_fast_path_answers_total") >= 1
    assert moved("privsep_server_responses_total", route="GET /v1/operator/runs", status="401")
    assert moved("privsep_server_responses_total", route="unmatched", status="404") == 1
    routes = {dict(labels).get("route") for (_, labels) in after}
    assert not any(r and "/no/such" in r for r in routes)


def test_the_operator_fetches_the_document(api: ApiHarness) -> None:
    op = api.operator_session()
    spec = api.client.get("/v1/operator/openapi.json", headers=bearer(op)).json()
    assert spec["openapi"].startswith("3.")
    assert "/v1/task/succeed" in spec["paths"]
    assert "/v1/operator/metrics" in spec["paths"]
