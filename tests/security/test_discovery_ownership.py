"""Discovery's reports, attacked: a second supervisor speaks for another's definition files,
and a second file declares a workflow id that a first file already declares.

A real ``runner server`` on SQLite and a real ``runner supervisor`` (supervisor A) run as
processes (see ``tests/runner/stack.py``); its parse sandboxes are real. Supervisor B is
registered on the same server with a key of its own, and the test plays B: it opens a
session with B's real key and sends what a compromised or misconfigured supervisor could.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from sqlalchemy import create_engine, select

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runner"))  # the shared Stack
from stack import Stack, running_stack

from privsep.secrets.keys import load_private_key
from privsep.secrets.tokens import create_assertion
from privsep.server.db import sqlite_url_for
from privsep.server.db.models import AuditLog

# Planted by this folder's conftest for the sandbox attacks; a real server or supervisor
# started with them would take them for systemd's and fail.
_SYSTEMD_NAMES = ("NOTIFY_SOCKET", "CREDENTIALS_DIRECTORY", "LISTEN_FDS", "WATCHDOG_USEC")


def _workflow(workflow_id: str, body: str = "return None") -> str:
    return (
        "from privsep.client import Context, Workflow\n\n"
        f"wf = Workflow({workflow_id!r}, schedule=None)\n\n\n"
        f"@wf.task\ndef hello(ctx: Context) -> None:\n    {body}\n"
    )


def _definition(workflow_id: str) -> dict[str, Any]:
    """What a parse sandbox reports for a file declaring ``workflow_id``."""
    task = {"task_id": "hello", "upstream": [], "module": "evil", "qualname": "hello"}
    return {"workflow_id": workflow_id, "schedule": None, "tasks": [task]}


@pytest.fixture
def stack(monkeypatch: pytest.MonkeyPatch) -> Iterator[Stack]:
    for name in _SYSTEMD_NAMES:
        monkeypatch.delenv(name, raising=False)
    with running_stack("po-", uid_first=214_000) as s:
        yield s


def _workflows(stack: Stack) -> dict[str, Any]:
    resp = stack.operator("GET", "/v1/operator/workflows")
    assert resp.status_code == 200, resp.text
    return {w["id"]: w for w in resp.json()["workflows"]}


def _parse_errors(stack: Stack, name: str) -> list[dict[str, Any]]:
    errors = stack.operator("GET", "/v1/operator/parse-errors").json()["errors"]
    return [e for e in errors if e["file_path"].endswith("/" + name)]


class SupervisorB:
    """A second registered supervisor, driven by hand with its own real key."""

    def __init__(self, stack: Stack) -> None:
        self.url = stack.url
        key_file = stack.home / "node-b" / "supervisor.key"
        key_file.parent.mkdir(mode=0o700)
        for args in (
            ("credentials", "create", "--out", str(key_file)),
            ("supervisors", "register", "sup-b", "--public-key", f"{key_file}.pub"),
        ):
            done = stack.runner(*args)
            assert done.returncode == 0, (args, done.stderr)
        assertion = create_assertion(
            load_private_key(str(key_file)), supervisor_name="sup-b", audience=stack.url
        )
        resp = requests.post(
            self.url + "/v1/supervisor/session", json={"assertion": assertion}, timeout=10
        )
        assert resp.status_code == 200, resp.text
        self.token = resp.json()["token"]

    def post(self, path: str, body: Any, token: str | None = None) -> requests.Response:
        return requests.post(
            self.url + path,
            json=body,
            timeout=10,
            headers={"Authorization": f"Bearer {token or self.token}"},
        )


def _refused(resp: requests.Response, *words: str) -> None:
    assert resp.status_code == 403, resp.text
    body = resp.json()
    assert body["code"] == "not_owner", body
    for word in words:
        assert word in body["message"], body


def test_a_second_supervisor_cannot_speak_for_another_supervisors_files(stack: Stack) -> None:
    folder = stack.home / "workflows"
    source = _workflow("payroll").encode()
    (folder / "payroll.py").write_bytes(source)
    (folder / "manifest.json").write_text('{"workflows": {"payroll": "payroll.py"}}')
    stack.start("supervisor", "supervisor")  # supervisor A, "sup-test"
    stack.wait_for(lambda: "payroll" in _workflows(stack), 60, "payroll.py to be parsed")
    # A stops, so that nobody but B claims what B queues.
    assert stack.stop("supervisor") == 0
    before = _workflows(stack)["payroll"]
    assert before["active"] and before["source_uri"].endswith("/payroll.py")
    a_file = before["source_uri"]
    a_pinned = f"{a_file}#sha256={hashlib.sha256(source).hexdigest()}"

    b = SupervisorB(stack)
    queue, batch = "/v1/supervisor/parse-jobs", "/v1/supervisor/parse-jobs/batch"
    # A's own file, with A's own workflow id, with none, and with a tampered pin.
    _refused(b.post(queue, {"uri": a_pinned, "workflow_ids": ["payroll"]}), a_file, "'sup-test'")
    _refused(b.post(queue, {"uri": a_pinned}), a_file)
    _refused(b.post(queue, {"uri": f"{a_file}#sha256={'0' * 64}", "workflow_ids": []}), a_file)
    # B's own file, to which B's manifest "assigns" A's workflow.
    b_file = "file:///srv/node-b/workflows/payroll.py"
    _refused(b.post(queue, {"uri": b_file, "workflow_ids": ["payroll"]}), "'payroll'", b_file)
    # A batch that hides A's file among B's: refused whole, nothing queued.
    mine = {"uri": "file:///srv/node-b/workflows/mine.py", "workflow_ids": ["mine"]}
    _refused(b.post(batch, {"jobs": [mine, {"uri": a_pinned}]}), a_file)
    # A's file reported deleted, alone or among B's files.
    deleted = "/v1/supervisor/deleted-files"
    _refused(b.post(deleted, {"uris": [a_file]}), a_file)
    _refused(b.post(deleted, {"uris": ["file:///srv/node-b/workflows/gone.py", a_file]}), a_file)

    claimed = b.post("/v1/supervisor/claim", {"kinds": ["parse"], "max_items": 10})
    assert claimed.json()["items"] == [], "a refused report queued nothing"

    # B's own files are B's to report: one that declares a workflow of B's own is stored...
    assert b.post(queue, mine).status_code == 200
    # ...and one whose result (B runs the parse itself) declares A's workflow is an import
    # error, although its job named no workflow ids (B without a manifest).
    sneaky = "file:///srv/node-b/workflows/sneaky.py"
    assert b.post(queue, {"uri": sneaky}).status_code == 200
    items = b.post("/v1/supervisor/claim", {"kinds": ["parse"], "max_items": 10}).json()["items"]
    by_uri = {item["uri"]: item for item in items}
    assert sorted(by_uri) == [mine["uri"], sneaky]
    for uri, workflow_id in ((mine["uri"], "mine"), (sneaky, "payroll")):
        resp = b.post(
            "/v1/parse/result",
            {"workflows": [_definition(workflow_id)]},
            token=by_uri[uri]["token"],
        )
        assert resp.status_code == 200, resp.text
    [error] = _parse_errors(stack, "sneaky.py")
    assert "declares workflow 'payroll'" in error["message"], error
    assert a_file in error["message"], error
    assert "mine" in _workflows(stack)

    after = _workflows(stack)["payroll"]
    assert after == before, "A's workflow is unchanged"

    # Each refusal left an audit record that names B.
    engine = create_engine(sqlite_url_for(stack.home / "state" / "privsep.db"))
    try:
        with engine.connect() as conn:
            denials = [
                row.detail
                for row in conn.execute(
                    select(AuditLog.detail).where(
                        AuditLog.event == "request_denied", AuditLog.actor == "sup-b"
                    )
                )
            ]
    finally:
        engine.dispose()
    assert len(denials) == 7, denials
    assert all(d["code"] == "not_owner" and d["owner"] == "sup-test" for d in denials), denials


def test_without_a_manifest_the_first_file_keeps_a_workflow_id(stack: Stack) -> None:
    folder = stack.home / "workflows"
    (folder / "first.py").write_text(_workflow("dup"))
    stack.start("supervisor", "supervisor")
    stack.wait_for(lambda: "dup" in _workflows(stack), 60, "first.py to be parsed")
    before = _workflows(stack)["dup"]
    assert before["active"] and before["source_uri"].endswith("/first.py")

    # Another file declares the same id: an import error that names both files.
    (folder / "second.py").write_text(_workflow("dup", "return 2"))
    [error] = stack.wait_for(lambda: _parse_errors(stack, "second.py"), 60, "second.py's error")
    assert "declares workflow 'dup'" in error["message"], error
    assert before["source_uri"] in error["message"], error
    assert error["file_path"] in error["message"], error
    assert _workflows(stack)["dup"] == before

    # Deleting the duplicate changes nothing for the first file's workflow.
    (folder / "second.py").unlink()
    state = stack.home / "state" / "discovery.json"
    stack.wait_for(
        lambda: state.exists() and "second.py" not in state.read_text(),
        60,
        "the supervisor to report second.py deleted",
    )
    assert _workflows(stack)["dup"] == before

    # And the first file still defines it: an edit makes a new current version.
    (folder / "first.py").write_text(_workflow("dup", "return 1"))
    stack.wait_for(
        lambda: _workflows(stack)["dup"]["current_version_id"] != before["current_version_id"],
        60,
        "first.py's edit to be parsed",
    )
    after = _workflows(stack)["dup"]
    assert after["active"] and after["source_uri"] == before["source_uri"]
