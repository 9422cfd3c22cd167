"""The credential socket's proxy, the real sandbox backend, scale and secrecy, attacked
with real process trees as root; how the trees are built, and what "gets nothing" means, is
in test_credsock.py's docstring and credsock_kit.py."""

from __future__ import annotations

import hashlib
import http.server
import json
import logging
import os
import pickle
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import requests
from credsock_kit import (
    PROXY_REQ,
    TOKEN_REQ,
    Harness,
    _out_of_turn,
    _uids,
    assert_got_nothing,
    frame,
    only_reply,
    outsider,
)

from privsep._token import Token
from privsep.runner.supervisor.credsock import (
    CredentialServer,
    SocketEntry,
)
from privsep.sandbox import Limits, ProcessBackend, SandboxSpec, UidPool

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: drops to sandbox uids")


# --- proxy ---------------------------------------------------------------------------------


class _Api(http.server.BaseHTTPRequestHandler):
    seen: list[dict[str, Any]] = []  # noqa: RUF012 - shared with the test by design

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length)) if length else None
        _Api.seen.append(
            {"method": self.command, "path": self.path, "auth": self.headers["Authorization"]}
        )
        if self.path.endswith("/slow"):
            time.sleep(2.0)
        status = 201 if self.command in ("POST", "PUT") else 200
        out = json.dumps({"echo": body, "path": self.path}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    do_GET = do_POST = do_PUT = do_DELETE = _serve

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def api() -> Iterator[str]:
    _Api.seen = []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Api)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def requests_handler(base: str) -> Callable[[str, str, Any, str], tuple[int, Any]]:
    """What the supervisor supplies: one real HTTP call with the work item's token."""

    def handler(method: str, path: str, body: Any, token: str) -> tuple[int, Any]:
        resp = requests.request(
            method,
            base + path,
            json=body,
            headers={"Authorization": f"Bearer {token}"},
            timeout=5,
        )
        return resp.status_code, resp.json() if resp.content else None

    return handler


def test_proxy_relays_status_and_body_from_a_real_http_server(harness: Harness, api: str) -> None:
    harness.proxy = requests_handler(api)
    sb = harness.sandbox()
    result = sb.probe(
        mode="client_proxy", method="PUT", api_path="/v1/task/xcoms/k", body={"v": [1, 2]}
    )
    assert result["status"] == 201
    assert result["body"] == {"echo": {"v": [1, 2]}, "path": "/v1/task/xcoms/k"}
    assert _Api.seen == [
        {"method": "PUT", "path": "/v1/task/xcoms/k", "auth": f"Bearer {sb.token}"}
    ]
    assert sb.entry.counters.proxied == 1
    assert harness.proxied_for == [sb.entry.sandbox_id]  # the supervisor learns whose call


def test_proxy_unreachable_api_is_server_unavailable(harness: Harness, caplog: Any) -> None:
    base = "http://127.0.0.1:9"  # discard port: nothing listens
    handler = requests_handler(base)

    def leaky(method: str, path: str, body: Any, token: str) -> tuple[int, Any]:
        try:
            return handler(method, path, body, token)
        except requests.ConnectionError as exc:
            raise requests.ConnectionError(f"{exc} while sending {token}") from None

    harness.proxy = leaky
    sb = harness.sandbox()
    caplog.set_level(logging.DEBUG, logger="privsep")
    reply = only_reply(sb.probe(sends=[PROXY_REQ]))["obj"]
    assert reply["type"] == "error" and reply["code"] == "server_unavailable"
    assert sb.entry.counters.proxy_unavailable == 1
    assert "API unreachable" in caplog.text
    assert sb.token not in caplog.text  # scrubbed from the handler's own message
    assert harness.violations == []


def test_a_slow_api_call_does_not_hold_up_other_sandboxes(harness: Harness, api: str) -> None:
    harness.proxy = requests_handler(api)
    slow = harness.sandbox()
    fast = harness.sandbox()
    slow.tree.send(
        {"uid": slow.uid, "path": slow.path, "mode": "client_proxy", "method": "GET",
         "api_path": "/v1/task/variables/slow"}
    )  # fmt: skip
    deadline = time.monotonic() + 5
    while not _Api.seen and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _Api.seen, "the slow call never reached the API"
    started = time.monotonic()
    assert only_reply(fast.probe(sends=[TOKEN_REQ]))["obj"]["token"] == fast.token
    assert time.monotonic() - started < 1.5
    assert slow.tree.lines.until_done()["status"] == 200


# --- through the real sandbox backend ----------------------------------------------------------

SANDBOX_SCRIPT = """
import hashlib, os, sys, time
from privsep.client._transport import SocketChannel, TokenSource

def digest():
    path = os.environ["PRIVSEP_CREDENTIAL_SOCKET"]
    token = TokenSource(SocketChannel(path), timeout=10).get().reveal()
    return hashlib.sha256(token.encode()).hexdigest()

print("direct", digest(), os.getuid(), flush=True)
r, w = os.pipe()
if os.fork() == 0:  # the child leaves at once; its child is an orphan in the sandbox
    if os.fork() == 0:
        os.close(r)
        while os.getppid() != 1:  # reparented to PID 1 of the sandbox: an orphan now
            time.sleep(0.01)
        os.write(w, ("orphan " + digest() + "\\n").encode())
        os._exit(0)
    os._exit(0)
os.close(w)
sys.stdout.write(os.read(r, 200).decode())
"""


@pytest.mark.parametrize("mode", ["spawn", "template"])
def test_a_real_sandbox_and_its_orphan_get_the_token(
    sockroot: str, tmp_path: Any, mode: str
) -> None:
    """The process backend's monitor is the bound root; user code runs as PID 1 of its own PID
    namespace under a pool uid, sees the socket bind-mounted, and its pids arrive global."""
    os.chmod(tmp_path, 0o755)
    bundle = tmp_path / "bundle"
    bundle.mkdir(mode=0o755)
    script = bundle / "ask.py"
    script.write_text(SANDBOX_SCRIPT)
    script.chmod(0o644)
    token = "tok-real-" + os.urandom(8).hex()
    first = {"spawn": 121_000, "template": 121_100}[mode]
    with (
        ProcessBackend(
            launch_mode="spawn" if mode == "spawn" else "template",
            uid_pool=UidPool(first, 4),
            prewarm=0,
        ) as backend,
        CredentialServer() as server,
    ):
        sid = f"real{mode}"
        entry = server.open_socket(sid, directory_root=sockroot)  # uid not known yet
        spec = SandboxSpec(
            kind="task",
            entry_point="privsep.sandbox.entrypoints:run_path",
            argv=(str(script),),
            workdir=str(tmp_path / "work"),
            bundle_paths=(str(bundle),),
            env={"PRIVSEP_CREDENTIAL_SOCKET": entry.path},
            credential_socket=entry.path,
            limits=Limits(wall_seconds=30),
            sandbox_id=sid,
        )
        handle = backend.launch(spec)
        assert handle.pid is not None and handle.uid is not None
        entry.set_token(token, int(time.time()) + 600)
        entry.bind_process(handle.pid, handle.uid, handle.uid)
        status = handle.wait(60)
        out = handle.output().text
        counters = entry.counters
    assert status is not None and status.exit_code == 0, out
    digest = hashlib.sha256(token.encode()).hexdigest()
    assert f"direct {digest} {handle.uid}" in out, out
    assert f"orphan {digest}" in out, out
    assert token not in out
    assert counters.tokens_served == 2 and counters.peer_rejected == 0


# --- scale and secrecy -----------------------------------------------------------------------


def test_two_hundred_sandboxes_at_once_on_one_thread(harness: Harness, sockroot: str) -> None:
    root = harness.tree()
    sandboxes: list[tuple[SocketEntry, int, str]] = []
    for _ in range(200):
        uid = next(_uids)
        entry = harness.server.open_socket(f"m{uid}", directory_root=sockroot, uid=uid, gid=uid)
        entry.bind_process(root.pid)
        token = f"tok-m{uid}"
        entry.set_token(token, int(time.time()) + 600)
        sandboxes.append((entry, uid, token))
    loops = [t for t in threading.enumerate() if t.name == "privsep-credsock"]
    assert len(loops) == 1
    threads_before = threading.active_count()
    fifo = os.path.join(sockroot, "release")
    os.mkfifo(fifo, 0o600)
    try:
        items = [{"uid": uid, "path": e.path} for e, uid, _ in sandboxes]
        root.send({"mode": "fanout", "items": items, "release_fifo": fifo})
        collected = root.lines.read(timeout=60)
        assert collected["connected"] == 200
        got = {r["i"]: r["token"] for r in collected["results"]}
        assert got == {i: tok for i, (_, _, tok) in enumerate(sandboxes)}
        assert harness.server.stats()["open_connections"] == 200  # all held at once
        assert threading.active_count() == threads_before
        with open(fifo, "wb") as f:
            f.write(b"x")
        root.lines.until_done(timeout=60)
    finally:
        os.unlink(fifo)
    assert harness.server.stats()["tokens_served"] == 200


def test_the_token_never_shows_in_reprs_logs_or_errors(harness: Harness, caplog: Any) -> None:
    caplog.set_level(logging.DEBUG, logger="privsep")
    sb = harness.sandbox(token="tok-SECRET-VALUE-42")
    assert only_reply(sb.probe(sends=[TOKEN_REQ]))["obj"]["token"] == sb.token
    _out_of_turn(harness, sb, [frame({"type": "bogus"})], False)
    assert_got_nothing(outsider({"uid": sb.uid, "path": sb.path, "sends": [TOKEN_REQ.hex()]}))
    sb.entry.end()
    texts = [repr(sb.entry), str(sb.entry), repr(harness.server.stats()), caplog.text]
    assert caplog.text  # something was logged
    for text in texts:
        assert "tok-SECRET-VALUE-42" not in text
    secret = Token("tok-SECRET-VALUE-42", 0)
    assert "tok-SECRET" not in repr(secret) + str(secret)
    with pytest.raises(TypeError):
        pickle.dumps(secret)


def test_stop_closes_everything_and_removes_the_directories(sockroot: str) -> None:
    h = Harness(sockroot)
    sb = h.sandbox()
    assert only_reply(sb.probe(sends=[TOKEN_REQ]))["obj"]["token"] == sb.token
    h.server.stop()
    assert not os.path.exists(sb.entry.directory)
    assert [t for t in threading.enumerate() if t.name == "privsep-credsock"] == []
    with pytest.raises(RuntimeError, match="closed"):
        h.server.open_socket("after", directory_root=sockroot, uid=120_999)
    h.close()
