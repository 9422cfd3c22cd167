"""Retiring a signing key, attacked through real ``runner server`` processes and real keys.

A token signed by the retired key is refused from then on: by the replica that had it in its
verified-token cache, by a second replica on the same database that still holds the key in
its own copy of the ring, after a restart, and ``/v1/jwks`` stops listing the key. A key
pruned from the ring stops verifying too. Every server here re-reads its key set every
``REFRESH`` seconds (``server.signing_keys_refresh``); the tests wait that long (twice, plus a
margin) where the documented delay applies, and assert nothing about how fast it happened.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from privsep.secrets.keyring import list_keys, prune, rotate
from privsep.secrets.tokens import create_assertion
from privsep.server.db import Database
from privsep.server.public import retire_signing_key
from server import conftest as server_fixtures
from server.api import ApiHarness, bearer, task, workflow
from server.postgres import free_port

# The database fixtures of the server tests (a fresh migrated SQLite file and PostgreSQL
# database per test, and the cluster behind them), shared rather than copied.
postgres_cluster = server_fixtures.postgres_cluster
_postgres_template = server_fixtures._postgres_template
migrated_db_url = server_fixtures.migrated_db_url
db = server_fixtures.db


@pytest.fixture(autouse=True)
def next_sandbox_runs_normally() -> None:
    """These attacks go at the API and the key ring, not at a sandbox: there is no sandbox
    whose health the suite's canary (tests/security/conftest.py) would check afterwards."""


REFRESH = 1.0
AUDIENCE = "http://privsep.test"


def env_for(home: Path, db_url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PRIVSEP")}
    env.update(
        PRIVSEP_HOME=str(home),
        PRIVSEP__DATABASE__URL=db_url,
        PRIVSEP__SERVER__URL=AUDIENCE,
        PRIVSEP__SERVER__SIGNING_KEYS_REFRESH=str(REFRESH),
        **extra,
    )
    return env


def runner(home: Path, db_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "privsep", *args],
        env=env_for(home, db_url),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def ok(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 0, done.stderr
    return done.stdout


def make_home(path: Path, db_url: str) -> Path:
    """A server home: a key ring, an operator credential, a registered supervisor."""
    path.mkdir(mode=0o700)
    ok(runner(path, db_url, "keys", "rotate"))
    creds = path / "credentials"
    ok(runner(path, db_url, "credentials", "create", "--out", str(creds / "operator.key")))
    ok(runner(path, db_url, "credentials", "create", "--out", str(creds / "supervisor.key")))
    ok(
        runner(
            path,
            db_url,
            "supervisors",
            "register",
            "sup1",
            "--public-key",
            str(creds / "supervisor.key.pub"),
            "--replace",
        )
    )
    return path


def private_key(path: Path) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    assert isinstance(key, Ed25519PrivateKey)
    return key


class Server:
    """One ``runner server`` process on its own port, stopped at the end of the test."""

    def __init__(self, home: Path, db_url: str) -> None:
        self.home, self.db_url = home, db_url
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> Server:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "privsep", "server"],
            env=env_for(
                self.home,
                self.db_url,
                PRIVSEP__SERVER__BIND=f"127.0.0.1:{self.port}",
                PRIVSEP__SERVER__SOCKET=f"run/server/api-{self.port}.sock",
            ),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                if self.proc.poll() is not None:
                    err = self.proc.stderr.read() if self.proc.stderr else ""
                    raise AssertionError(err) from None
                time.sleep(0.1)
        raise AssertionError("the server did not listen within 30 s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=20)

    def operator_token(self) -> str:
        assertion = create_assertion(
            private_key(self.home / "credentials" / "operator.key"),
            supervisor_name="operator",
            audience=AUDIENCE,
        )
        resp = requests.post(
            self.url + "/v1/operator/session", json={"assertion": assertion}, timeout=10
        )
        assert resp.status_code == 200, resp.text
        return str(resp.json()["token"])

    def supervisor_token(self) -> str:
        assertion = create_assertion(
            private_key(self.home / "credentials" / "supervisor.key"),
            supervisor_name="sup1",
            audience=AUDIENCE,
        )
        resp = requests.post(
            self.url + "/v1/supervisor/session", json={"assertion": assertion}, timeout=10
        )
        assert resp.status_code == 200, resp.text
        return str(resp.json()["token"])

    def as_operator(self, token: str) -> int:
        """An operator route (a synchronous dependency)."""
        resp = requests.get(
            self.url + "/v1/operator/workflows",
            headers={"Authorization": f"Bearer {token}"},
            timeout=10,
        )
        return resp.status_code

    def as_supervisor(self, token: str) -> int:
        """A supervisor route (the async dependency, whose cache hits stay on the loop)."""
        resp = requests.post(
            self.url + "/v1/supervisor/heartbeat",
            headers={"Authorization": f"Bearer {token}"},
            timeout=10,
        )
        return resp.status_code

    def jwks_kids(self) -> set[str]:
        keys = requests.get(self.url + "/v1/jwks", timeout=10).json()["keys"]
        return {k["kid"] for k in keys}


@pytest.fixture
def servers() -> Iterator[list[Server]]:
    started: list[Server] = []
    yield started
    for server in started:
        server.stop()


def kid_of(token: str) -> str:
    import base64

    header = token.split(".")[0]
    return str(json.loads(base64.urlsafe_b64decode(header + "=" * (-len(header) % 4)))["kid"])


def wait_out_the_key_cache() -> None:
    """What the documented delay promises, with room for a busy machine."""
    time.sleep(2 * REFRESH + 1.0)


def test_a_retired_key_verifies_nothing_on_any_replica_nor_after_a_restart(
    migrated_db_url: str, tmp_path: Path, servers: list[Server]
) -> None:
    home = make_home(tmp_path / "a", migrated_db_url)
    a = Server(home, migrated_db_url).start()
    servers.append(a)
    old_op, old_sup = a.operator_token(), a.supervisor_token()
    old = kid_of(old_op)
    assert kid_of(old_sup) == old
    # Both verify, and are now in replica A's verified-token cache.
    assert (a.as_operator(old_op), a.as_supervisor(old_sup)) == (200, 200)

    ok(runner(home, migrated_db_url, "keys", "rotate"))
    (new,) = {e.kid for e in list_keys(home / "keys" / "signing")} - {old}

    # Replica B: the same database, its own copy of the ring (taken after the rotation, so it
    # still holds the old key's files: only the database can tell it the key is retired).
    home_b = tmp_path / "b"
    shutil.copytree(home, home_b, ignore=shutil.ignore_patterns("run", "state"))
    b = Server(home_b, migrated_db_url).start()
    servers.append(b)
    assert (b.as_operator(old_op), b.as_supervisor(old_sup)) == (200, 200)  # cached on B too
    assert {old, new} <= a.jwks_kids() and {old, new} <= b.jwks_kids()

    done = runner(home, migrated_db_url, "keys", "retire", old)
    assert done.returncode == 0, done.stderr
    assert f"signing key {old} retired" in done.stdout
    assert not (home / "keys" / "signing" / f"{old}.key").exists()

    wait_out_the_key_cache()
    for server in (a, b):
        assert server.as_operator(old_op) == 401
        assert server.as_supervisor(old_sup) == 401
        assert old not in server.jwks_kids()
        assert new in server.jwks_kids()
    # A picked up the rotation without a restart: what it signs now verifies everywhere.
    fresh = a.operator_token()
    assert kid_of(fresh) == new
    assert (a.as_operator(fresh), b.as_operator(fresh)) == (200, 200)

    a.stop()
    b.stop()
    a2 = Server(home, migrated_db_url).start()
    servers.append(a2)
    b2 = Server(home_b, migrated_db_url).start()
    servers.append(b2)
    for server in (a2, b2):
        assert server.as_operator(old_op) == 401
        assert server.as_supervisor(old_sup) == 401
        assert old not in server.jwks_kids()

    listed = json.loads(ok(runner(home, migrated_db_url, "keys", "list", "--json")))["keys"]
    states = {k["kid"]: (k["state"], k["in_ring"]) for k in listed}
    assert states == {new: ("signing", True), old: ("retired", False)}


def test_a_replica_whose_signer_is_retired_refuses_to_start(
    migrated_db_url: str, tmp_path: Path
) -> None:
    home = make_home(tmp_path / "a", migrated_db_url)
    stale = tmp_path / "stale"
    shutil.copytree(home, stale)  # a replica whose ring copy was never rotated
    old = list_keys(home / "keys" / "signing")[-1].kid
    ok(runner(home, migrated_db_url, "keys", "rotate"))
    ok(runner(home, migrated_db_url, "keys", "retire", old))
    proc = subprocess.run(
        [sys.executable, "-m", "privsep", "server"],
        env=env_for(stale, migrated_db_url, PRIVSEP__SERVER__BIND=f"127.0.0.1:{free_port()}"),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert f"signing key {old}" in line and "is retired" in line and "runner keys rotate" in line


def test_retiring_the_signing_key_is_refused_with_the_fix(
    migrated_db_url: str, tmp_path: Path
) -> None:
    home = make_home(tmp_path / "a", migrated_db_url)
    signer = list_keys(home / "keys" / "signing")[-1].kid
    done = runner(home, migrated_db_url, "keys", "retire", signer)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"runner: {signer} is the key the server signs with; "
        "run `runner keys rotate` first, then retire it"
    ]
    unknown = runner(home, migrated_db_url, "keys", "retire", "A" * 16)
    assert unknown.returncode == 1 and "no signing key AAAAAAAAAAAAAAAA" in unknown.stderr
    bad = runner(home, migrated_db_url, "keys", "retire", "../../etc/passwd")
    assert bad.returncode == 2 and "is not a key id" in bad.stderr
    listed = json.loads(ok(runner(home, migrated_db_url, "keys", "list", "--json")))["keys"]
    assert [(k["kid"], k["state"]) for k in listed] == [(signer, "signing")]


def test_a_pruned_key_stops_verifying_and_stays_refused_after_a_restart(
    migrated_db_url: str, tmp_path: Path, servers: list[Server]
) -> None:
    home = make_home(tmp_path / "a", migrated_db_url)
    a = Server(home, migrated_db_url).start()
    servers.append(a)
    old_op = a.operator_token()
    old = kid_of(old_op)
    ok(runner(home, migrated_db_url, "keys", "rotate"))
    assert a.as_operator(old_op) == 200
    # Pruning with no overlap left: the key leaves the ring, its published copy must follow.
    assert prune(home / "keys" / "signing", 0, now=time.time() + 1) == [old]
    wait_out_the_key_cache()
    assert a.as_operator(old_op) == 401
    assert old not in a.jwks_kids()
    a.stop()
    a2 = Server(home, migrated_db_url).start()
    servers.append(a2)
    assert a2.as_operator(old_op) == 401
    assert old not in a2.jwks_kids()


def test_health_names_no_supervisor_without_an_operator_session(
    migrated_db_url: str, tmp_path: Path, servers: list[Server]
) -> None:
    home = make_home(tmp_path / "a", migrated_db_url)
    a = Server(home, migrated_db_url).start()
    servers.append(a)
    resp = requests.get(a.url + "/v1/health", timeout=10)
    assert resp.status_code == 200
    body = resp.json()
    assert set(body) == {"status", "instance"}, body
    assert body["status"] == "ok" and "sup1" not in resp.text
    # The instance is the deployment's: another replica on the same ring says the same.
    b = Server(home, migrated_db_url).start()
    servers.append(b)
    assert requests.get(b.url + "/v1/health", timeout=10).json()["instance"] == body["instance"]

    token = a.operator_token()
    detail = requests.get(
        a.url + "/v1/health", headers={"Authorization": f"Bearer {token}"}, timeout=10
    ).json()
    assert detail["database"] == "ok"
    assert [s["name"] for s in detail["supervisors"]] == ["sup1"]
    # A supervisor's session is not an operator's, and a forged token is no session at all.
    for header in (f"Bearer {a.supervisor_token()}", "Bearer x.y.z"):
        refused = requests.get(a.url + "/v1/health", headers={"Authorization": header}, timeout=10)
        assert refused.status_code == 401 and "sup1" not in refused.text


def test_a_task_token_the_fast_path_cached_is_refused_once_its_key_is_retired(
    db: Database, migrated_db_url: str, tmp_path: Path
) -> None:
    """The task fast path answers from the verified-token cache on the event loop: a cached
    task token of a retired key must fall out of it too (in-process app, real keys, real DB)."""
    api = ApiHarness(db, tmp_path, signing_keys_refresh=0.2)
    api.register_supervisor("sup")
    sess = api.supervisor_session("sup")
    op = api.operator_session()
    api.define_workflow(sess, workflow("wf", task("t")))
    api.trigger_run(op, "wf")
    (work,) = api.claim(sess, ["task"])
    assert api.client.get("/v1/task/context", headers=bearer(work.token)).status_code == 200
    assert len(api.state.token_cache) > 0  # the next hit is the cache's
    ring = str(tmp_path / "ring")
    old = kid_of(work.token)
    rotate(ring)
    assert f"signing key {old} retired" in retire_signing_key(migrated_db_url, ring, old)
    time.sleep(0.2 * 2 + 0.3)  # the refresh interval this harness was given, and a margin
    refused = api.client.get("/v1/task/context", headers=bearer(work.token))
    assert refused.status_code == 401, refused.text
    assert old not in {k["kid"] for k in api.client.get("/v1/jwks").json()["keys"]}
    api.client.close()


def test_a_kid_that_begins_with_a_dash_is_read_as_the_kid(
    migrated_db_url: str, tmp_path: Path
) -> None:
    """Rings made before new kids stopped beginning with ``-`` may hold such a key; ``runner
    keys retire`` takes it as `runner keys list` prints it, with no ``--`` needed (argparse would
    otherwise call it an unrecognised option, with a usage error)."""
    home = make_home(tmp_path / "a", migrated_db_url)
    dashed = "-sVMFq0rY2abcdEF"
    done = runner(home, migrated_db_url, "keys", "retire", dashed)
    assert done.returncode == 1, done.stderr
    assert "unrecognized arguments" not in done.stderr and "usage:" not in done.stderr
    assert dashed in done.stderr and "Traceback" not in done.stderr
