"""A database outage, on real processes: ``runner server`` on a real PostgreSQL that is killed
(``pg_ctl stop -m immediate``) and started again.

While it is down every route answers 503 with ``Retry-After``: the operator's, the
supervisor's, and the task's, those the fast path answers included; the operator command says
so in one line. The server's log gets one line when the outage starts and one when it ends,
whatever the requests and the scheduler's and reaper's passes meanwhile, and no traceback.
When PostgreSQL is back the same tokens work again, without restarting the server.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests

from privsep.secrets.keys import load_private_key
from privsep.secrets.tokens import create_assertion

from .api import task, workflow
from .postgres import PostgresCluster, PostgresUnavailable, free_port
from .test_server_cli import env_for, runner


class Server:
    """``runner server`` with one worker (its scheduler in the same process) on ``db_url``."""

    def __init__(self, home: Path, db_url: str) -> None:
        self.home = home
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.env = {
            "PRIVSEP__DATABASE__URL": db_url,
            "PRIVSEP__SERVER__BIND": f"127.0.0.1:{port}",
            "PRIVSEP__SERVER__URL": self.url,
            "PRIVSEP__SERVER__WORKERS": "1",
            # Passes often enough to run several times during the outage: the scheduler every
            # 0.2 s, the reaper every 5 s (a quarter of the heartbeat timeout).
            "PRIVSEP__SERVER__SCHEDULER_INTERVAL": "0.2",
            "PRIVSEP__SERVER__SUPERVISOR_HEARTBEAT_TIMEOUT": "20",
        }
        self.log = home / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def runner(self, *args: str) -> subprocess.CompletedProcess[str]:
        return runner(self.home, *args, **self.env)

    def start(self) -> None:
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "privsep", "server"],
                env=env_for(self.home, **self.env),
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        wait_for(lambda: self.get("/v1/health").status_code == 200, "the server to start")

    def stop(self) -> str:
        """SIGTERM, wait, and return everything it logged."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)  # one worker: uvicorn re-raises the SIGTERM it caught
            finally:
                if self.proc.poll() is None:
                    self.proc.kill()
                    self.proc.wait()
        return self.log.read_text(errors="replace")

    def request(
        self, method: str, path: str, token: str | None = None, body: Any = None
    ) -> requests.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return requests.request(
            method, self.url + path, json=body, headers=headers, timeout=20, allow_redirects=False
        )

    def get(self, path: str, token: str | None = None) -> requests.Response:
        try:
            return self.request("GET", path, token)
        except requests.ConnectionError:
            response = requests.Response()
            response.status_code = 599  # not listening yet
            return response

    def session(self, kind: str, key_file: str, name: str) -> str:
        key = load_private_key(str(self.home / "credentials" / key_file))
        assertion = create_assertion(key, supervisor_name=name, audience=self.url)
        resp = self.request("POST", f"/v1/{kind}/session", body={"assertion": assertion})
        assert resp.status_code == 200, resp.text
        return str(resp.json()["token"])

    def claim(self, sup: str, kind: str) -> dict[str, Any]:
        resp = self.request("POST", "/v1/supervisor/claim", sup, {"kinds": [kind], "max_items": 1})
        assert resp.status_code == 200, resp.text
        (item,) = resp.json()["items"]
        return dict(item)


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _unavailable(resp: requests.Response, what: str) -> None:
    assert resp.status_code == 503, (what, resp.status_code, resp.text)
    assert resp.headers.get("Retry-After", "").isdigit(), (what, resp.headers)
    assert int(resp.headers["Retry-After"]) > 0
    body = resp.json()
    if what == "health":  # the short answer an unauthenticated prober gets
        assert body["status"] == "degraded" and "database" not in body, body
    else:
        assert body["code"] == "database_unavailable", (what, resp.text)


@pytest.fixture
def cluster() -> Any:
    """A PostgreSQL cluster of this test's own: it is killed and started again."""
    try:
        pg = PostgresCluster()
    except PostgresUnavailable as exc:
        pytest.fail(f"PostgreSQL is needed for this test: {exc}")
    with pg:
        yield pg


def test_a_database_outage_answers_503_logs_once_and_recovers(
    cluster: PostgresCluster, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    server = Server(home, cluster.url(cluster.create_database("privsep_outage")))
    for args in (
        ("keys", "rotate"),
        ("db", "upgrade"),
        ("credentials", "create", "--out", str(home / "credentials/sup.key")),
        ("credentials", "create", "--out", str(home / "credentials" / "operator.key")),
        (
            "supervisors",
            "register",
            "sup1",
            "--public-key",
            str(home / "credentials/sup.key.pub"),
        ),
    ):
        done = server.runner(*args)
        assert done.returncode == 0, (args, done.stderr)
    server.start()
    try:
        # Before: a workflow, a run, and its one task claimed (its token in hand).
        sup = server.session("supervisor", "sup.key", "sup1")
        op = server.session("operator", "operator.key", "operator")
        uri = f"file:///workflows/wf-{uuid.uuid4().hex[:6]}.py"
        resp = server.request("POST", "/v1/supervisor/parse-jobs", sup, {"uri": uri})
        assert resp.status_code == 200, resp.text
        parse = server.claim(sup, "parse")
        resp = server.request(
            "POST", "/v1/parse/result", parse["token"], {"workflows": [workflow("wf", task("t"))]}
        )
        assert resp.status_code == 200, resp.text
        resp = server.request("POST", "/v1/operator/workflows/wf/runs", op, {"conf": {}})
        assert resp.status_code == 200, resp.text
        run_id = resp.json()["id"]
        work = server.claim(sup, "task")["token"]
        assert server.get("/v1/task/context", work).status_code == 200
        assert server.request("POST", "/v1/supervisor/heartbeat", sup).status_code == 200

        cluster.crash()
        calls: list[tuple[str, Callable[[], requests.Response]]] = [
            ("health", lambda: server.get("/v1/health")),
            ("operator runs", lambda: server.get("/v1/operator/runs", op)),
            ("operator run", lambda: server.get(f"/v1/operator/runs/{run_id}", op)),
            (
                "supervisor heartbeat",
                lambda: server.request("POST", "/v1/supervisor/heartbeat", sup),
            ),
            (
                "supervisor claim (fast path)",
                lambda: server.request(
                    "POST", "/v1/supervisor/claim", sup, {"kinds": ["task"], "max_items": 1}
                ),
            ),
            ("task context (fast path)", lambda: server.get("/v1/task/context", work)),
            ("task variable (fast path)", lambda: server.get("/v1/task/variables/v", work)),
            (
                "task succeed (fast path)",
                lambda: server.request("POST", "/v1/task/succeed", work, {"return_value": 1}),
            ),
            (
                "task xcom push",
                lambda: server.request("PUT", "/v1/task/xcoms/k", work, {"value": 1}),
            ),
            (
                "new supervisor session",
                lambda: requests.post(
                    server.url + "/v1/supervisor/session",
                    json={
                        "assertion": create_assertion(
                            load_private_key(str(home / "credentials/sup.key")),
                            supervisor_name="sup1",
                            audience=server.url,
                        )
                    },
                    timeout=20,
                ),
            ),
        ]
        for _ in range(2):  # twice over: the second round is inside the same incident
            for what, call in calls:
                _unavailable(call(), what)
        listed = server.runner("runs", "list")
        assert listed.returncode != 0
        assert "Traceback" not in listed.stderr
        assert len(listed.stderr.strip().splitlines()) == 1, listed.stderr
        assert "database is unavailable" in listed.stderr and "try again" in listed.stderr
        time.sleep(6)  # the scheduler and the reaper fail a few passes each, quietly

        cluster.restart()
        # Nobody restarts the server: the next requests open new connections and succeed.
        wait_for(lambda: server.get("/v1/health").status_code == 200, "the server to recover")
        assert server.request("POST", "/v1/supervisor/heartbeat", sup).status_code == 200
        context = server.get("/v1/task/context", work)
        assert context.status_code == 200, (
            context.text,
            server.get(f"/v1/operator/runs/{run_id}/attempts", op).text,
        )
        done = server.request("POST", "/v1/task/succeed", work, {"return_value": 1})
        assert done.status_code == 200, done.text
        assert server.get(f"/v1/operator/runs/{run_id}", op).json()["state"] == "success"
        assert server.runner("runs", "list").returncode == 0
    finally:
        with contextlib.suppress(Exception):
            if not cluster._started:
                cluster.restart()
        log = server.stop()
    assert "Traceback" not in log, log
    assert "Exception in ASGI application" not in log, log
    started = [line for line in log.splitlines() if "is unavailable" in line]
    ended = [line for line in log.splitlines() if "answers again after" in line]
    assert len(started) == 1, log
    assert len(ended) == 1, log
    assert cluster.password not in log
