"""Discovery queues many changed files in one request, and still works with a server that has
no batch route. The supervisor's real API client, over HTTP on a unix socket, to the real app
served by uvicorn in a thread (real database, real auth)."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn
from sqlalchemy import select
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from privsep.runner.api.session import SupervisorApi
from privsep.runner.supervisor.discovery_reports import (
    PARSE_JOBS_PER_REQUEST,
    queue_parse_jobs,
    report_deleted,
)
from privsep.server.db import Database
from privsep.server.db.models import ParseJob

from .api import AUDIENCE, ApiHarness, bearer

BATCH_ROUTE = "/v1/supervisor/parse-jobs/batch"


@pytest.fixture
def api(db: Database, tmp_path: Path) -> Iterator[ApiHarness]:
    harness = ApiHarness(db, tmp_path)
    harness.register_supervisor("sup")
    yield harness
    harness.client.close()


@contextlib.contextmanager
def serving(app: ASGIApp, api: ApiHarness, sock: Path) -> Iterator[SupervisorApi]:
    """``app`` under uvicorn on ``sock``, and the supervisor's client for it."""
    server = uvicorn.Server(uvicorn.Config(app, uds=str(sock), log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield SupervisorApi(
            "http://privsep.test",
            "sup",
            api.supervisors["sup"],
            audience=AUDIENCE,
            unix_socket=str(sock),
        )
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture
def client(api: ApiHarness, tmp_path: Path) -> Iterator[SupervisorApi]:
    with serving(api.app, api, tmp_path / "api.sock") as supervisor_api:
        yield supervisor_api


@pytest.fixture
def older_client(api: ApiHarness, tmp_path: Path) -> Iterator[SupervisorApi]:
    """A server older than the supervisor, which this test cannot install: the real app
    behind a wrapper that answers the batch route as an app without it would (404)."""

    async def without_batch_route(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == BATCH_ROUTE:
            missing = JSONResponse({"code": "not_found", "message": "Not Found"}, 404)
            await missing(scope, receive, send)
            return
        await api.app(scope, receive, send)

    with serving(without_batch_route, api, tmp_path / "old.sock") as supervisor_api:
        yield supervisor_api


def jobs(count: int) -> list[dict[str, str]]:
    return [{"uri": f"file:///w/f{n:05d}.py", "content_hash": f"{n:064x}"} for n in range(count)]


def queued_uris(api: ApiHarness) -> list[str]:
    with api.state.db.read_session() as session:
        return sorted(session.scalars(select(ParseJob.uri)))


def test_changed_files_are_queued_in_requests_of_the_batch_size(
    api: ApiHarness, client: SupervisorApi
) -> None:
    count = PARSE_JOBS_PER_REQUEST + 3  # two requests: a full one and a short one
    assert queue_parse_jobs(client, jobs(count), batch=True) is True
    assert queued_uris(api) == sorted(j["uri"] for j in jobs(count))


def test_a_server_without_the_batch_route_gets_the_files_one_by_one(
    api: ApiHarness, older_client: SupervisorApi
) -> None:
    assert queue_parse_jobs(older_client, jobs(3), batch=True) is False
    assert queued_uris(api) == sorted(j["uri"] for j in jobs(3))
    # Remembered by the caller: the next scan does not ask for the batch route again.
    assert queue_parse_jobs(older_client, jobs(5)[3:], batch=False) is False
    assert len(queued_uris(api)) == 5


def test_one_changed_file_needs_no_batch(api: ApiHarness, older_client: SupervisorApi) -> None:
    assert queue_parse_jobs(older_client, jobs(1), batch=True) is True  # never asked
    assert queued_uris(api) == [jobs(1)[0]["uri"]]


def test_another_supervisors_file_is_skipped_and_the_rest_still_queued(
    api: ApiHarness, client: SupervisorApi, caplog: pytest.LogCaptureFixture
) -> None:
    """A refusal for another supervisor's file is final: logged, skipped, and the scan's
    other files (in the same batch) and deletions still reach the server."""
    api.register_supervisor("other")
    theirs = jobs(4)[1]
    resp = api.client.post(
        "/v1/supervisor/parse-jobs", json=theirs, headers=bearer(api.supervisor_session("other"))
    )
    assert resp.status_code == 200
    assert queue_parse_jobs(client, jobs(4), batch=True) is True
    with api.state.db.read_session() as session:
        mine = sorted(session.scalars(select(ParseJob.uri).where(ParseJob.uri != theirs["uri"])))
    assert mine == sorted(j["uri"] for j in jobs(4) if j["uri"] != theirs["uri"])
    assert f"definition file {theirs['uri']} not queued: 403 not_owner" in caplog.text
    report_deleted(client, [jobs(4)[0]["uri"], theirs["uri"]])  # does not raise
    assert f"deleted file {theirs['uri']} not reported: 403 not_owner" in caplog.text
