"""The server-host commands as an operator runs them: real processes, real sockets.

``runner keys rotate``, ``runner db upgrade|check``, ``runner supervisors register`` and
``runner server`` itself, which must refuse to start on a permission violation and otherwise
listen on TCP and on a 0660 unix socket in a 0750 directory.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .postgres import free_port


def env_for(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PRIVSEP")}
    env["PRIVSEP_HOME"] = str(home)
    env.update(extra)
    return env


def runner(home: Path, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "privsep", *args],
        env=env_for(home, **extra),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture
def home(tmp_path: Path) -> Path:
    h = tmp_path / "home"
    h.mkdir(mode=0o700)
    return h


def prepared(home: Path) -> Path:
    """A home with a key ring, a migrated database and a registered supervisor."""
    assert runner(home, "keys", "rotate").returncode == 0
    assert runner(home, "db", "upgrade").returncode == 0
    key = home / "credentials" / "supervisor.key"
    assert runner(home, "credentials", "create", "--out", str(key)).returncode == 0
    done = runner(home, "supervisors", "register", "sup1", "--public-key", f"{key}.pub")
    assert done.returncode == 0, done.stderr
    return key


def test_db_upgrade_is_idempotent_and_check_reports(home: Path) -> None:
    before = runner(home, "db", "check")
    assert before.returncode == 1
    assert "head" in before.stdout
    first = runner(home, "db", "upgrade")
    assert first.returncode == 0, first.stderr
    second = runner(home, "db", "upgrade")
    assert second.returncode == 0
    assert "already at head" in second.stdout + second.stderr
    after = runner(home, "db", "check")
    assert after.returncode == 0, after.stdout + after.stderr


def test_keys_rotate_creates_then_adds(home: Path) -> None:
    first = runner(home, "keys", "rotate")
    assert first.returncode == 0 and "created key ring" in first.stdout
    second = runner(home, "keys", "rotate")
    assert second.returncode == 0 and "added signing key" in second.stdout
    ring = home / "keys" / "signing"
    assert stat.S_IMODE(ring.stat().st_mode) == 0o700
    assert len(list(ring.glob("*.key"))) == 2
    assert runner(home, "check-perms").returncode == 0


def test_keys_rotate_where_the_ring_cannot_be_written_is_one_line(home: Path) -> None:
    # A path below a file: mkdir fails for root too, as a home volume owned by another uid
    # does for a container's user.
    (home / "blocker").write_text("")
    done = runner(
        home, "keys", "rotate", PRIVSEP__SERVER__SIGNING_KEYRING=str(home / "blocker/ring")
    )
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [
        f"runner: cannot write the key ring at {home / 'blocker/ring'}: Not a directory"
    ]


def test_registering_twice_needs_replace(home: Path) -> None:
    key = prepared(home)
    again = runner(home, "supervisors", "register", "sup1", "--public-key", f"{key}.pub")
    assert again.returncode == 1
    assert "already registered" in again.stderr and "--replace" in again.stderr
    replaced = runner(
        home, "supervisors", "register", "sup1", "--public-key", f"{key}.pub", "--replace"
    )
    assert replaced.returncode == 0
    bad = runner(home, "supervisors", "register", "sup2", "--public-key", str(key))
    assert bad.returncode == 1
    assert "not a PEM public key" in bad.stderr
    assert "PRIVATE" not in bad.stderr + bad.stdout


def test_server_refuses_to_start_on_a_violation(home: Path) -> None:
    key = prepared(home)
    key.chmod(0o644)
    proc = runner(home, "server", PRIVSEP__SERVER__BIND=f"127.0.0.1:{free_port()}")
    assert proc.returncode == 1
    assert f"{key}: has mode 0644" in proc.stderr
    assert "refusing to start the server" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.fixture
def server(home: Path) -> Iterator[tuple[subprocess.Popen[str], int, Path]]:
    prepared(home)
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "privsep", "server"],
        env=env_for(home, PRIVSEP__SERVER__BIND=f"127.0.0.1:{port}", PRIVSEP__SERVER__WORKERS="2"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                break
        except OSError:
            if proc.poll() is not None:
                raise AssertionError(proc.stderr.read() if proc.stderr else "") from None
            time.sleep(0.1)
    try:
        yield proc, port, home / "run" / "server" / "api.sock"
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=20)


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost")
        self.unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(self.unix_path)
        self.sock = sock


def get_json(conn: http.client.HTTPConnection, path: str) -> tuple[int, dict[str, object]]:
    conn.request("GET", path)
    resp = conn.getresponse()
    return resp.status, json.loads(resp.read())


def test_server_listens_on_tcp_and_a_private_unix_socket(
    server: tuple[subprocess.Popen[str], int, Path],
) -> None:
    proc, port, sock_path = server
    status, body = get_json(http.client.HTTPConnection("127.0.0.1", port, timeout=5), "/v1/health")
    # Unauthenticated: up or not, and which deployment; no supervisor names (see
    # test_key_retirement.py for the operator's detailed answer).
    assert status == 200 and set(body) == {"status", "instance"} and body["status"] == "ok"
    assert stat.S_ISSOCK(sock_path.stat().st_mode)
    assert stat.S_IMODE(sock_path.stat().st_mode) == 0o660
    assert stat.S_IMODE(sock_path.parent.stat().st_mode) == 0o750
    status, body = get_json(UnixHTTPConnection(str(sock_path)), "/v1/health")
    assert status == 200 and body["status"] == "ok"
    # The API document is for operator sessions only (tests/server/test_observability.py).
    status, _ = get_json(UnixHTTPConnection(str(sock_path)), "/v1/openapi.json")
    assert status == 404
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0


def test_runner_health_for_the_server_asks_its_health_endpoint(
    server: tuple[subprocess.Popen[str], int, Path], home: Path
) -> None:
    proc, port, _ = server
    # A wildcard bind (a container's) is probed on loopback.
    up = runner(home, "health", "--component", "server", PRIVSEP__SERVER__BIND=f"0.0.0.0:{port}")
    assert (up.returncode, up.stdout) == (0, f"server answers /v1/health on 127.0.0.1:{port}\n")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0
    down = runner(
        home, "health", "--component", "server", PRIVSEP__SERVER__BIND=f"127.0.0.1:{port}"
    )
    assert down.returncode == 1
    assert down.stdout == f"server does not answer /v1/health on 127.0.0.1:{port}\n"


def test_strict_mode_opt_out_is_loud(home: Path) -> None:
    key = prepared(home)
    key.chmod(0o640)
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "privsep", "server"],
        env=env_for(
            home,
            PRIVSEP__SERVER__BIND=f"127.0.0.1:{port}",
            PRIVSEP__CORE__STRICT_PERMISSIONS="false",
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    break
            except OSError:
                time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    assert "WARNING: server is starting with" in err
    assert "development only" in err
    assert f"{key}: has mode 0640" in err


def test_runner_scheduler_runs_on_its_own_and_fires_schedules(home: Path) -> None:
    import json as _json
    from datetime import timedelta

    from sqlalchemy import select

    from privsep.server.db import Database, sqlite_url_for
    from privsep.server.db.models import Run, Workflow, WorkflowVersion, utcnow

    prepared(home)
    db = Database.from_url(sqlite_url_for(home / "state" / "privsep.db"))
    definition = {
        "workflow_id": "ticker",
        "schedule": 1.0,
        "tasks": [
            {
                "task_id": "t",
                "upstream": [],
                "retries": 0,
                "retry_delay": 0,
                "timeout": None,
                "module": "ticker",
                "qualname": "t",
            }
        ],
    }
    with db.write_session() as session:
        wf = Workflow(id="ticker", created_at=utcnow() - timedelta(seconds=5))
        session.add(wf)
        session.flush()
        version = WorkflowVersion(
            workflow_id="ticker", definition=_json.dumps(definition), content_hash="x"
        )
        session.add(version)
        session.flush()
        wf.current_version_id = version.id
    proc = subprocess.Popen(
        [sys.executable, "-m", "privsep", "scheduler"],
        env=env_for(home, PRIVSEP__SERVER__SCHEDULER_INTERVAL="0.2"),
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        kinds: list[str] = []
        while time.monotonic() < deadline and len(kinds) < 2:
            time.sleep(0.3)
            with db.read_session() as session:
                kinds = [
                    r.trigger_kind.value
                    for r in session.scalars(select(Run).where(Run.workflow_id == "ticker"))
                ]
        assert len(kinds) >= 2, "an interval schedule of 1 s fired fewer than twice"
        assert set(kinds) == {"schedule"}
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        db.dispose()
    assert proc.returncode == 0, err
    assert "privsep scheduler running" in err
