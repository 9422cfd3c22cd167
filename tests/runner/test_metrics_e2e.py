"""Metrics after a real run: a real ``runner server`` with two workers (so the values of
several processes are summed: prometheus_client's multiprocess mode), a real supervisor with
its metrics listener, and a workflow run to success in real sandboxes. The server's metrics
are scraped with an operator session, the supervisor's from its loopback listener, and both
are parsed with ``prometheus_client``'s own parser."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families
from stack import Stack, free_port, running_stack

CHAIN = textwrap.dedent("""
    from privsep.client import Context, Workflow

    wf = Workflow("metered", schedule=None)

    @wf.task
    def first(ctx: Context) -> int:
        return 1

    @wf.task(upstream=[first])
    def second(ctx: Context) -> int:
        return ctx.xcom_pull("first") + 1
""")

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= set(ls))


@pytest.fixture
def stack() -> Iterator[tuple[Stack, str]]:
    metrics_url = f"http://127.0.0.1:{free_port()}/metrics"
    with running_stack(
        "pm-",
        uid_first=236_000,
        PRIVSEP__SERVER__WORKERS="2",
        PRIVSEP__SUPERVISOR__METRICS_BIND=metrics_url.split("/")[2],
    ) as s:
        (s.home / "workflows" / "metered.py").write_text(CHAIN)
        yield s, metrics_url


def test_metrics_after_a_real_run(stack: tuple[Stack, str]) -> None:
    s, supervisor_url = stack
    s.start("supervisor", "supervisor")
    run_id = s.trigger_when_parsed("metered")
    s.wait_for(lambda: s.run_state(run_id) in ("success", "failed"), 90, "the run")
    assert s.run_state(run_id) == "success", s.attempts(run_id)
    # A deliberately refused request: the supervisor's session is no operator's.
    assert requests.get(s.url + "/v1/operator/runs", timeout=5).status_code == 401

    resp = s.operator("GET", "/v1/operator/metrics")
    assert resp.status_code == 200, resp.text
    server = parse(resp.text)
    # Each worker kept its own values; the scrape (answered by one of them) sums them all.
    assert total(server, "privsep_server_claimed_items_total", kind="task") >= 2
    assert total(server, "privsep_server_claimed_items_total", kind="parse") >= 1
    assert total(server, "privsep_server_tokens_issued_total", scope="task") >= 2
    assert total(server, "privsep_server_tokens_issued_total", scope="operator") >= 1
    assert total(server, "privsep_server_tokens_issued_total", scope="supervisor") >= 1
    assert total(server, "privsep_server_refusals_total", code="missing_token") >= 1
    route = "POST /v1/task/succeed"
    assert total(server, "privsep_server_request_duration_seconds_count", route=route) >= 2
    # Each task's context came with its claim, through its supervisor: no task asked for it.
    route = "GET /v1/task/context"
    assert total(server, "privsep_server_request_duration_seconds_count", route=route) == 0
    # The scheduler runs in the server's main process, not in a worker: its values are there
    # only because every process writes to the shared directory.
    assert total(server, "privsep_server_scheduler_pass_duration_seconds_count") >= 1
    routes = {dict(labels).get("route") for (_, labels) in server} - {None}
    assert all(r == "unmatched" or " /v1/" in r for r in routes), routes

    supervisor = parse(requests.get(supervisor_url, timeout=5).text)
    assert total(supervisor, "privsep_supervisor_claimed_items_total", kind="task") >= 2
    assert total(supervisor, "privsep_supervisor_claims_total", result="work") >= 2
    assert total(supervisor, "privsep_supervisor_launches_total", result="started") >= 3
    assert total(supervisor, "privsep_supervisor_launches_total", result="failed") == 0
    count = "privsep_supervisor_launch_duration_seconds_count"
    assert total(supervisor, count, kind="task") >= 2
    assert total(supervisor, count, kind="parse") >= 1
    assert ("privsep_supervisor_running_sandboxes", (("kind", "task"),)) in supervisor


def test_the_operator_fetches_the_api_document_and_anonymous_gets_401(
    stack: tuple[Stack, str],
) -> None:
    s, _ = stack
    assert requests.get(s.url + "/v1/operator/openapi.json", timeout=5).status_code == 401
    assert requests.get(s.url + "/v1/operator/metrics", timeout=5).status_code == 401
    resp = s.operator("GET", "/v1/operator/openapi.json")
    assert resp.status_code == 200
    served: dict[str, Any] = resp.json()
    offline = s.runner("api", "spec", "--json")
    assert offline.returncode == 0, offline.stderr
    assert json.loads(offline.stdout) == served


def test_runner_api_spec_prints_an_openapi_3_document_offline() -> None:
    """No home, no configuration, no server: the document comes from the app factory."""
    done = subprocess.run(
        [sys.executable, "-m", "privsep", "api", "spec"],
        env={"PATH": "/usr/bin:/bin", "PRIVSEP_HOME": "/nonexistent/privsep"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    spec = json.loads(done.stdout)
    assert spec["openapi"].startswith("3.")
    for path in (
        "/v1/task/context",
        "/v1/parse/result",
        "/v1/supervisor/claim",
        "/v1/operator/runs",
        "/v1/operator/metrics",
        "/v1/operator/openapi.json",
    ):
        assert path in spec["paths"], path
    # Every operation is well formed enough for schemathesis to load and plan it.
    import schemathesis

    schema = schemathesis.openapi.from_dict(spec)
    assert len([op.ok() for op in schema.get_all_operations()]) > 20
