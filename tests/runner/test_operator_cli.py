"""The operator CLI against a real ``runner server`` (and a real supervisor where runs must end).

Every command goes through ``python -m privsep`` as an operator would type it, with the
operator credential that ``runner credentials create`` wrote. Each invocation is checked for
the two things that hold for all of them: no traceback, and none of the connection secrets
used in this module anywhere in stdout or stderr.

The server's error mapping for statuses this server never sends to an operator (403, 5xx,
a non-JSON body) and the 401 retry are checked against a small stand-in HTTP server.
"""

from __future__ import annotations

import http.server
import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.fernet import Fernet
from stack import Stack, free_port, short_home

from privsep.runner.cli.operator_client import OperatorClient
from privsep.runner.cli.output import clean, one_line
from privsep.runner.errors import CommandError
from privsep.secrets.fernet import FieldCipher
from privsep.secrets.keys import generate_ed25519_pem

UID_FIRST = 150_000
PASSWORD = "hunter2-Sup3r-S3cret-pw"
PASSWORD_2 = "second-S3cret-password-xyz"
EXTRA_SECRET = "extra-token-abc123-secret"
SECRETS = (PASSWORD, PASSWORD_2, EXTRA_SECRET)

GOOD = textwrap.dedent("""
    from privsep.client import Context, Workflow

    wf = Workflow("good", schedule=None)

    @wf.task
    def first(ctx: Context) -> int:
        return 1

    @wf.task(upstream=[first])
    def second(ctx: Context) -> int:
        return ctx.xcom_pull("first") + 1
""")

BAD = textwrap.dedent("""
    from privsep.client import Context, Workflow

    wf = Workflow("bad", schedule=None)

    @wf.task
    def boom(ctx: Context) -> None:
        raise RuntimeError("boom on purpose")

    @wf.task(upstream=[boom])
    def after(ctx: Context) -> None:
        pass
""")

BROKEN = "from privsep.client import Workflow\nraise ImportError('broken on purpose')\n"


def runner(
    stack: Stack, *args: str, stdin: str | None = None, **env: str
) -> subprocess.CompletedProcess[str]:
    """``runner ARGS`` in the stack's environment, checked for leaks and tracebacks."""
    done = subprocess.run(
        [sys.executable, "-m", "privsep", *args],
        env={**stack.env, **env},
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    for secret in SECRETS:
        assert secret not in done.stdout and secret not in done.stderr, (args, done)
    assert "Traceback" not in done.stderr, (args, done.stderr)
    return done


def ok_json(stack: Stack, *args: str, stdin: str | None = None) -> Any:
    done = runner(stack, *args, "--json", stdin=stdin)
    assert done.returncode == 0, (args, done.stderr)
    return json.loads(done.stdout)


def fails(stack: Stack, code: int, *args: str, **env: str) -> str:
    """Run a command that must fail with ``code``; return its one stderr line."""
    done = runner(stack, *args, **env)
    assert done.returncode == code, (args, done.returncode, done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    if code != 2:  # argparse usage errors print the usage line too
        assert len(lines) == 1, done.stderr
    return lines[-1]


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    # A short home: unix socket paths of the per-sandbox sockets must stay under 107 bytes.
    home = short_home("op-")
    s = Stack(home, uid_first=UID_FIRST, PRIVSEP__SERVER__FERNET_KEY=Fernet.generate_key().decode())
    s.setup()
    for name, source in (("good", GOOD), ("bad", BAD), ("broken", BROKEN)):
        (home / "workflows" / f"{name}.py").write_text(source)
    (home / "workflows" / "syntax.py").write_text("def nope(:\n")
    s.start_server()
    s.start("supervisor", "supervisor")
    try:
        s.wait_for(lambda: _parsed(s), 90, "good, bad and two parse errors")
        yield s
    finally:
        s.stop_all()
        shutil.rmtree(home, ignore_errors=True)


def _parsed(stack: Stack) -> bool:
    workflows = ok_json(stack, "workflows", "list")["workflows"]
    errors = ok_json(stack, "workflows", "errors")["errors"]
    return {w["id"] for w in workflows} >= {"good", "bad"} and len(errors) >= 2


# --- workflows -------------------------------------------------------------------------------


def test_workflows_list_show_and_errors(stack: Stack) -> None:
    workflows = {w["id"]: w for w in ok_json(stack, "workflows", "list")["workflows"]}
    good = workflows["good"]
    assert good["active"] is True
    assert good["task_count"] == 2 and workflows["bad"]["task_count"] == 2
    assert isinstance(good["current_version_id"], int)
    assert good["schedule"] is None and good["bundle_version"] == ""
    assert good["source_uri"].endswith("good.py")

    human = runner(stack, "workflows", "list")
    assert human.returncode == 0
    assert human.stdout.splitlines()[0].split() == [
        "WORKFLOW",
        "ACTIVE",
        "VERSION",
        "BUNDLE",
        "SCHEDULE",
        "TASKS",
    ]
    assert any(line.split()[:2] == ["good", "yes"] for line in human.stdout.splitlines())

    shown = ok_json(stack, "workflows", "show", "good")
    assert shown["id"] == "good" and shown["current_version_id"] == good["current_version_id"]
    tasks = {t["task_id"]: t for t in shown["definition"]["tasks"]}
    assert tasks["second"]["upstream"] == ["first"]
    human = runner(stack, "workflows", "show", "good")
    assert "second" in human.stdout and "first" in human.stdout

    line = fails(stack, 1, "workflows", "show", "nope")
    assert line == "runner: cannot show workflow 'nope': no workflow 'nope'"

    errors = ok_json(stack, "workflows", "errors")["errors"]
    by_file = {Path(e["file_path"]).name: e for e in errors}
    assert "broken on purpose" in by_file["broken.py"]["message"]
    assert "SyntaxError" in by_file["syntax.py"]["message"]
    stamps = [e["created_at"] for e in errors]
    assert stamps == sorted(stamps, reverse=True)  # newest first
    human = runner(stack, "workflows", "errors")
    assert "broken.py" in human.stdout and "broken on purpose" in human.stdout
    assert len(ok_json(stack, "workflows", "errors", "--limit", "1")["errors"]) == 1


# --- runs and tasks --------------------------------------------------------------------------


def test_trigger_wait_success_then_list_show_and_tasks(stack: Stack) -> None:
    done = runner(stack, "runs", "trigger", "good", "--wait", "--json", "--conf", '{"n": 3}')
    assert done.returncode == 0, done.stderr
    run = json.loads(done.stdout)
    assert run["state"] == "success" and run["workflow_id"] == "good"
    assert run["conf"] == {"n": 3}
    assert sorted((a["task_id"], a["state"]) for a in run["attempts"]) == [
        ("first", "success"),
        ("second", "success"),
    ]
    assert all(a["duration_seconds"] >= 0 for a in run["attempts"])

    listed = ok_json(stack, "runs", "list", "--workflow", "good")["runs"]
    assert run["id"] in [r["id"] for r in listed]
    assert {r["workflow_id"] for r in listed} == {"good"}
    assert run["id"] in runner(stack, "runs", "list").stdout

    shown = ok_json(stack, "runs", "show", run["id"])
    assert shown["state"] == "success" and shown["trigger_kind"] == "manual"
    assert len(shown["attempts"]) == 2
    human = runner(stack, "runs", "show", run["id"])
    assert "success" in human.stdout and "second" in human.stdout

    tasks = ok_json(stack, "tasks", "list", run["id"])
    assert tasks["run_id"] == run["id"]
    rows = {a["task_id"]: a for a in tasks["attempts"]}
    assert rows["first"]["try_number"] == 1 and rows["first"]["state"] == "success"
    assert isinstance(rows["second"]["duration_seconds"], float)
    human = runner(stack, "tasks", "list", run["id"])
    assert human.stdout.splitlines()[0].split() == ["TASK", "TRY", "STATE", "DURATION", "ATTEMPT"]
    # The attempt ids are what `runner logs` takes.
    assert rows["first"]["id"] in human.stdout

    line = fails(stack, 1, "runs", "show", "no-such-run")
    assert line == "runner: cannot show run 'no-such-run': no run 'no-such-run'"
    line = fails(stack, 1, "tasks", "list", "no-such-run")
    assert "no run 'no-such-run'" in line


def test_trigger_wait_failure_exits_1_with_the_reason(stack: Stack) -> None:
    done = runner(stack, "runs", "trigger", "bad", "--wait")
    assert done.returncode == 1, (done.stdout, done.stderr)
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("runner: run ") and " of workflow 'bad' failed: " in line
    assert "task 'boom' failed on try 1" in line and "boom on purpose" in line
    assert "upstream_failed" in done.stdout  # the table: `after` never ran

    done = runner(stack, "runs", "trigger", "bad", "--wait", "--json")
    assert done.returncode == 1
    run = json.loads(done.stdout)
    assert run["state"] == "failed"
    assert {a["task_id"]: a["state"] for a in run["attempts"]} == {
        "boom": "failed",
        "after": "upstream_failed",
    }


def test_trigger_without_wait_and_its_refusals(stack: Stack) -> None:
    run = ok_json(stack, "runs", "trigger", "good")
    assert run["workflow_id"] == "good" and run["state"] in ("queued", "running", "success")
    human = runner(stack, "runs", "trigger", "good")
    assert human.returncode == 0 and human.stdout.startswith("triggered run ")

    line = fails(stack, 1, "runs", "trigger", "nope")
    assert line == "runner: cannot trigger workflow 'nope': no parsed workflow 'nope'"
    line = fails(stack, 2, "runs", "trigger", "good", "--conf", "[1, 2]")
    assert line == "runner: --conf must be a JSON object, not list"
    line = fails(stack, 2, "runs", "trigger", "good", "--conf", "{nope")
    assert line.startswith("runner: --conf is not valid JSON: ")


# --- variables -------------------------------------------------------------------------------


def test_variables_set_get_list_delete(stack: Stack) -> None:
    out = ok_json(stack, "variables", "set", "target", "warehouse.t", "--description", "where")
    assert out == {"key": "target", "description": "where", "set": True}
    assert ok_json(stack, "variables", "get", "target") == {
        "key": "target",
        "value": "warehouse.t",
        "description": "where",
    }
    assert runner(stack, "variables", "get", "target").stdout == "warehouse.t\n"

    done = runner(stack, "variables", "set", "from_stdin", "--value-file", "-", stdin="v1\n")
    assert done.returncode == 0, done.stderr
    assert ok_json(stack, "variables", "get", "from_stdin")["value"] == "v1"

    listed = ok_json(stack, "variables", "list")["variables"]
    assert {"key": "target", "description": "where"} in listed
    assert all("value" not in v for v in listed)  # names only
    assert "target" in runner(stack, "variables", "list").stdout

    assert ok_json(stack, "variables", "delete", "target") == {"key": "target", "deleted": True}
    line = fails(stack, 1, "variables", "get", "target")
    assert line == "runner: cannot get variable 'target': no variable 'target'"
    line = fails(stack, 1, "variables", "delete", "target")
    assert line == "runner: cannot delete variable 'target': no variable 'target'"
    line = fails(stack, 2, "variables", "set", "k")
    assert line == "runner: give the value either as VALUE or with --value-file"


# --- connections -----------------------------------------------------------------------------


def _stored_secret(stack: Stack, conn_id: str, column: str) -> str:
    """What the database holds, decrypted with the server's key: proof the CLI sent it."""
    (db,) = stack.home.rglob("privsep.db")
    with sqlite3.connect(db) as conn:
        (ciphertext,) = conn.execute(
            f"SELECT {column} FROM connections WHERE conn_id = ?",  # noqa: S608 - test constant
            (conn_id,),
        ).fetchone()
    assert ciphertext and PASSWORD not in ciphertext
    return FieldCipher([stack.env["PRIVSEP__SERVER__FERNET_KEY"]]).decrypt(ciphertext)


def test_connections_add_get_list_delete_never_show_secrets(stack: Stack, tmp_path: Path) -> None:
    extra = tmp_path / "extra.json"
    extra.write_text(json.dumps({"token": EXTRA_SECRET}))
    added = ok_json(
        stack,
        "connections",
        "add",
        "warehouse",
        "--type",
        "postgres",
        "--host",
        "db.internal",
        "--port",
        "5432",
        "--login",
        "etl",
        "--schema",
        "analytics",
        "--extra-file",
        str(extra),
        "--password-stdin",
        stdin=PASSWORD + "\n",
    )
    assert added == {
        "conn_id": "warehouse",
        "conn_type": "postgres",
        "host": "db.internal",
        "port": 5432,
        "login": "etl",
        "password": "***",
        "schema": "analytics",
        "extra": "***",
        "description": None,
    }
    # The trailing newline of stdin is not part of the password.
    assert _stored_secret(stack, "warehouse", "password_encrypted") == PASSWORD
    assert EXTRA_SECRET in _stored_secret(stack, "warehouse", "extra_encrypted")

    assert ok_json(stack, "connections", "get", "warehouse") == added
    human = runner(stack, "connections", "get", "warehouse")
    assert "password:" in human.stdout and "***" in human.stdout
    assert ok_json(stack, "connections", "list")["connections"] == [added]
    assert "warehouse" in runner(stack, "connections", "list").stdout

    line = fails(stack, 1, "connections", "add", "warehouse", "--type", "postgres")
    assert line.startswith("runner: connection 'warehouse' exists already; pass --replace")

    secret_file = tmp_path / "pw"
    secret_file.write_text(PASSWORD_2 + "\n")
    replaced = ok_json(
        stack,
        "connections",
        "add",
        "warehouse",
        "--type",
        "postgres",
        "--password-file",
        str(secret_file),
        "--replace",
    )
    assert replaced["password"] == "***" and replaced["host"] is None
    assert _stored_secret(stack, "warehouse", "password_encrypted") == PASSWORD_2

    assert ok_json(stack, "connections", "delete", "warehouse")["deleted"] is True
    line = fails(stack, 1, "connections", "get", "warehouse")
    assert line == "runner: cannot get connection 'warehouse': no connection 'warehouse'"


def test_connection_secrets_never_come_from_or_go_to_the_terminal(
    stack: Stack, tmp_path: Path
) -> None:
    # There is no --password option; an abbreviation of the others is ambiguous, and argparse
    # does not echo the value it refused.
    done = runner(stack, "connections", "add", "c", "--type", "x", "--password", PASSWORD)
    assert done.returncode == 2
    done = runner(stack, "connections", "add", "c", "--type", "x", "--password-stdin", stdin="")
    assert done.returncode == 2 and "the password is empty" in done.stderr
    bad_extra = tmp_path / "extra.txt"
    bad_extra.write_text(f"token={EXTRA_SECRET}")
    line = fails(stack, 2, "connections", "add", "c", "--type", "x", "--extra-file", str(bad_extra))
    assert line.startswith(f"runner: --extra-file {bad_extra} is not valid JSON: ")
    line = fails(stack, 2, "connections", "add", "c", "--type", "x", "--password-file", "/nope")
    assert line == "runner: cannot read --password-file /nope: No such file or directory"


# --- policy ----------------------------------------------------------------------------------


def test_policy_grant_show_revoke(stack: Stack) -> None:
    grant = ok_json(stack, "policy", "grant", "etl_*", "connection", "warehouse")
    assert grant["workflow_pattern"] == "etl_*" and grant["kind"] == "connection"
    assert grant in ok_json(stack, "policy", "show")["grants"]
    human = runner(stack, "policy", "grant", "etl_*", "variable", "target")
    assert human.returncode == 0
    assert "may read variables matching 'target'" in human.stdout
    assert "etl_*" in runner(stack, "policy", "show").stdout

    line = fails(stack, 1, "policy", "grant", "etl_*", "connection", "warehouse")
    assert (
        line == "runner: cannot grant connection 'warehouse' to 'etl_*': that grant exists already"
    )
    assert ok_json(stack, "policy", "revoke", str(grant["id"])) == {
        "id": grant["id"],
        "revoked": True,
    }
    assert grant not in ok_json(stack, "policy", "show")["grants"]
    line = fails(stack, 1, "policy", "revoke", str(grant["id"]))
    assert line == f"runner: cannot revoke grant #{grant['id']}: no grant {grant['id']}"
    fails(stack, 2, "policy", "revoke", "first")
    fails(stack, 2, "policy", "grant", "*", "secret", "x")


# --- errors before the API answers ------------------------------------------------------------


def test_server_not_reachable(stack: Stack) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    line = fails(stack, 1, "runs", "list", PRIVSEP__SERVER__URL=url)
    assert line == (
        f"runner: cannot reach the server at {url}: Connection refused "
        "(is `runner server` running? check server.url and server.urls)"
    )


def test_no_operator_credential(stack: Stack, tmp_path: Path) -> None:
    missing = str(tmp_path / "operator.key")
    line = fails(stack, 1, "workflows", "list", PRIVSEP__OPERATOR__CREDENTIAL=missing)
    assert line == (
        f"runner: no operator credential at {missing}: create one with "
        f"`runner credentials create --out {missing}` and register its .pub with "
        f"`runner operators register NAME --public-key {missing}.pub` on the server host "
        "(or set operator.credential)"
    )


def test_insecure_operator_credential_is_refused(stack: Stack, tmp_path: Path) -> None:
    copy = tmp_path / "operator.key"
    shutil.copy(stack.home / "credentials/operator.key", copy)
    copy.chmod(0o644)
    line = fails(stack, 1, "policy", "show", PRIVSEP__OPERATOR__CREDENTIAL=str(copy))
    assert line.startswith(f"runner: refusing to use the operator credential: {copy}: has mode")
    assert f"chmod 600 {copy}" in line


def test_a_credential_the_server_does_not_know(stack: Stack, tmp_path: Path) -> None:
    other = tmp_path / "keys" / "other.key"
    done = runner(stack, "credentials", "create", "--out", str(other))
    assert done.returncode == 0, done.stderr
    line = fails(stack, 1, "runs", "list", PRIVSEP__OPERATOR__CREDENTIAL=str(other))
    assert line == (
        f"runner: cannot open an operator session with the server at {stack.url}: the server "
        f"refused the credential {other}: no active operator is registered with this key "
        "(`runner operators list` on the server host shows the registered keys)"
    )


def test_a_server_without_an_operator_key() -> None:
    home = short_home("op-")
    s = Stack(home, uid_first=UID_FIRST)
    try:
        s.setup()
        os.rename(home / "credentials/operator.key.pub", home / "credentials/elsewhere.pub")
        s.start_server()
        line = fails(s, 1, "workflows", "list")
        key = home / "credentials/operator.key"
        assert line == (
            f"runner: cannot open an operator session with the server at {s.url}: no "
            "operator is registered on this server (on the server host: `runner operators "
            f"register NAME --public-key {key}.pub`)"
        )
    finally:
        s.stop_all()
        shutil.rmtree(home, ignore_errors=True)


# --- the client against a stand-in server ----------------------------------------------------


class _StandIn(http.server.BaseHTTPRequestHandler):
    """Answers what the test scripts: (status, body) per path, in order."""

    script: dict[str, list[tuple[int, Any]]]
    seen: list[tuple[str, str, str]]

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        self.seen.append((self.command, self.path, self.headers.get("Authorization", "")))
        status, body = self.script[self.path].pop(0)
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = _answer

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def stand_in(tmp_path: Path) -> Iterator[tuple[OperatorClient, type[_StandIn]]]:
    handler = type("Handler", (_StandIn,), {"script": {}, "seen": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    key = tmp_path / "operator.key"
    private_pem, _ = generate_ed25519_pem()
    fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(private_pem)
    client = OperatorClient(f"http://127.0.0.1:{server.server_port}", str(key), timeout=5)
    try:
        yield client, handler
    finally:
        client.close()
        server.shutdown()
        server.server_close()


def _session(token: str) -> tuple[int, Any]:
    return 200, {"token": token, "expires_at": 2**31, "subject": "operator"}


def test_an_expired_session_is_reopened_once(
    stand_in: tuple[OperatorClient, type[_StandIn]],
) -> None:
    client, handler = stand_in
    handler.script = {
        "/v1/operator/session": [_session("t1"), _session("t2")],
        "/v1/operator/runs": [
            (401, {"code": "expired", "message": "token has expired"}),
            (200, {"runs": []}),
        ],
    }
    assert client.call("GET", "/v1/operator/runs", what="list runs") == {"runs": []}
    assert [auth for _, path, auth in handler.seen if path == "/v1/operator/runs"] == [
        "Bearer t1",
        "Bearer t2",
    ]


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (
            401,
            {"code": "revoked", "message": "no"},
            "cannot list runs: the server refused the operator session: no",
        ),
        (
            403,
            {"code": "forbidden", "message": "not yours"},
            "cannot list runs: forbidden: not yours",
        ),
        (404, {"code": "not_found", "message": "no such thing"}, "cannot list runs: no such thing"),
        (409, {"code": "conflict", "message": "it is busy"}, "cannot list runs: it is busy"),
        (
            422,
            {"code": "invalid_request", "message": "body.x: bad"},
            "cannot list runs: the server rejected the request: body.x: bad",
        ),
        (
            500,
            {"code": "error", "message": "boom"},
            "cannot list runs: the server failed (HTTP 500): boom (see the `runner server` log)",
        ),
        (
            502,
            b"<html>bad gateway</html>",
            "cannot list runs: the server failed (HTTP 502): HTTP 502 without an error body "
            "(see the `runner server` log)",
        ),
        (
            409,
            {"code": "x", "message": "line one\nline \x1b[31mtwo"},
            "cannot list runs: line one line \\x1b[31mtwo",
        ),
    ],
)
def test_refusals_become_one_line(
    stand_in: tuple[OperatorClient, type[_StandIn]], status: int, body: Any, expected: str
) -> None:
    client, handler = stand_in
    handler.script = {
        "/v1/operator/session": [_session("t1"), _session("t2")],
        "/v1/operator/runs": [(status, body), (status, body)],
    }
    with pytest.raises(CommandError) as err:
        client.call("GET", "/v1/operator/runs", what="list runs")
    assert str(err.value) == expected and err.value.code == 1


def test_terminal_escapes_are_shown_not_sent() -> None:
    assert clean("a\x1b[2Jb\u202ec") == "a\\x1b[2Jb\\u202ec"
    assert clean("one\ntwo", keep_newlines=True) == "one\ntwo"
    assert one_line("x" * 600, limit=10) == "xxxxxxxxx…"


def test_a_timeout_names_the_request(tmp_path: Path) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)  # accepts, never answers
    port = listener.getsockname()[1]
    key = tmp_path / "operator.key"
    fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(generate_ed25519_pem()[0])
    client = OperatorClient(f"http://127.0.0.1:{port}", str(key), timeout=0.5)
    try:
        with pytest.raises(CommandError) as err:
            client.call("GET", "/v1/operator/runs", what="list runs")
    finally:
        listener.close()
        client.close()
    # The session is asked for first, and that is the request the message names.
    assert str(err.value) == (
        f"the server at http://127.0.0.1:{port} did not answer POST /v1/operator/session "
        "within 0.5 s (is `runner server` overloaded or stuck?)"
    )
