"""The credential socket, attacked with real processes (run as root).

Every "sandbox" here is a real process tree: a root process forked from this test (uid 0, like
the process backend's monitor) whose children drop to the sandbox uid with
``drop_privileges`` before they connect. Outsiders are forked from the test itself, so they are
not in the tree. Replies are read off the real socket; "gets nothing" means the connection
closed with zero bytes received.

Pid reuse is not simulated: ``/proc/sys/kernel/ns_last_pid`` makes the kernel hand a new process
exactly the pid of one that has exited, and the test checks the stale pid earns nothing.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import http.server
import itertools
import json
import logging
import os
import pickle
import select
import signal
import socket
import stat
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

import pytest
import requests

from privsep._token import Token
from privsep.client._exceptions import PrivsepError
from privsep.client._transport import ProxyTransport, SocketChannel, TokenSource
from privsep.client._wire import MAX_FRAME, ProxyRequest, TokenRequest, parse_request
from privsep.runner.supervisor import credconn, peercheck
from privsep.runner.supervisor.credsock import (
    ALLOWED,
    CredentialServer,
    SandboxState,
    SocketEntry,
)
from privsep.sandbox import Limits, ProcessBackend, SandboxSpec, UidPool
from privsep.sandbox.privdrop import drop_privileges

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: drops to sandbox uids")


def _cannot_set_up(reason: str) -> NoReturn:
    """The attack could not be staged (another process kept taking the pid, or the kernel
    lacks what it needs). Under ``scripts/test`` (CI) that is a failure, never a skip that
    reads as a pass."""
    if os.environ.get("PRIVSEP_TESTS_STRICT") == "1":
        pytest.fail(f"could not stage the attack: {reason}")
    pytest.skip(reason)


_uids = itertools.count(120_000)
_HEADER = struct.Struct(">I")
LINE_TIMEOUT = 20.0


# --- frames ----------------------------------------------------------------------------------


def frame(obj: Any) -> bytes:
    payload = json.dumps(obj).encode()
    return _HEADER.pack(len(payload)) + payload


def raw_frame(payload: bytes) -> bytes:
    return _HEADER.pack(len(payload)) + payload


TOKEN_REQ = frame({"type": "token"})
PROXY_REQ = frame({"type": "proxy", "method": "GET", "path": "/v1/task/context", "body": None})


# --- code that runs in forked processes (no logging, no pytest, os._exit only) ----------------


def _close_fds_except(*keep: int) -> None:
    """A fork of this test holds copies of the server's sockets; drop them so that when the
    server closes a connection, the peer sees EOF at once."""
    prev = 3
    for fd in sorted(k for k in keep if k >= 3):
        os.closerange(prev, fd)
        prev = fd + 1
    os.closerange(prev, 65536)


def _emit(fd: int, obj: dict[str, Any]) -> None:
    data = (json.dumps(obj) + "\n").encode()
    while data:
        data = data[os.write(fd, data) :]


def _read_reply(sock: socket.socket) -> dict[str, Any]:
    """One reply frame, or how the connection ended: {kind: frame|eof|timeout, ...}."""
    buf = b""
    need = 4
    have_header = False
    while True:
        try:
            chunk = sock.recv(need - len(buf))
        except TimeoutError:
            return {"kind": "timeout", "bytes": len(buf)}
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            return {"kind": "eof", "bytes": len(buf)}
        buf += chunk
        if len(buf) < need:
            continue
        if not have_header:
            (length,) = _HEADER.unpack(buf)
            need = 4 + length
            have_header = True
            if len(buf) < need:
                continue
        return {"kind": "frame", "obj": json.loads(buf[4:])}


def _raw_exchange(spec: dict[str, Any]) -> dict[str, Any]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(spec.get("timeout", 5.0))
    try:
        sock.connect(spec["path"])
    except OSError as exc:
        return {"connect_errno": exc.errno}
    started = time.monotonic()
    replies: list[dict[str, Any]] = []
    sends = spec.get("sends", [])
    for i, chunk in enumerate(sends):
        try:
            sock.sendall(bytes.fromhex(chunk))
            if spec.get("shut_wr") and i == len(sends) - 1:
                sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            replies.append({"kind": "send_error", "errno": exc.errno})
            break
        reply = _read_reply(sock)
        replies.append(reply)
        if reply["kind"] != "frame":
            break
    if not sends:
        replies.append(_read_reply(sock))
    return {"replies": replies, "elapsed": time.monotonic() - started}


def _two_conns(spec: dict[str, Any]) -> dict[str, Any]:
    """Connection A is served, connection B misbehaves, then A asks again."""
    a = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    b = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    a.settimeout(5.0)
    b.settimeout(5.0)
    a.connect(spec["path"])
    a.sendall(TOKEN_REQ)
    replies = [_read_reply(a)]
    b.connect(spec["path"])
    b.sendall(bytes.fromhex(spec["bad"]))
    replies.append(_read_reply(b))
    try:
        a.sendall(TOKEN_REQ)
        replies.append(_read_reply(a))
    except OSError as exc:
        replies.append({"kind": "send_error", "errno": exc.errno})
    return {"replies": replies}


def _client_exchange(spec: dict[str, Any]) -> dict[str, Any]:
    """Through the real client SDK, as user code would."""
    channel = SocketChannel(spec["path"])
    try:
        if spec["mode"] == "client_token":
            tok = TokenSource(channel, timeout=5.0).get()
            return {"token": tok.reveal(), "expires_at": tok.expires_at}
        status, body = ProxyTransport(channel).request(
            spec["method"], spec["api_path"], spec.get("body"), timeout=10.0
        )
        return {"status": status, "body": body}
    except PrivsepError as exc:
        return {"exc": type(exc).__name__, "code": getattr(exc, "code", None), "msg": str(exc)}
    finally:
        channel.close()


def _fanout(spec: dict[str, Any], out_fd: int) -> None:
    """N children, each its own uid and socket, all connected at once, then all ask at once,
    then all hold their connection until the test writes to ``release_fifo``."""
    items = spec["items"]
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    hold_r, hold_w = os.pipe()
    res_r, res_w = os.pipe()
    pids = []
    for i, item in enumerate(items):
        pid = os.fork()
        if pid == 0:
            try:
                os.close(ready_r)
                os.close(go_w)
                os.close(hold_w)
                os.close(res_r)
                drop_privileges(item["uid"], item["uid"])
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(10.0)
                try:
                    sock.connect(item["path"])
                except OSError:
                    os.write(ready_w, b"e")
                    os._exit(0)
                os.write(ready_w, b"c")
                os.read(go_r, 1)
                try:
                    sock.sendall(TOKEN_REQ)
                    reply = _read_reply(sock)
                except OSError:
                    reply = {"kind": "eof", "bytes": 0}
                token = reply["obj"].get("token") if reply["kind"] == "frame" else None
                _emit(res_w, {"i": i, "kind": reply["kind"], "token": token})
                os.read(hold_r, 1)
            finally:
                os._exit(0)
        pids.append(pid)
    for fd in (ready_w, go_r, hold_r, res_w):
        os.close(fd)
    got = b""
    while len(got) < len(items):
        got += os.read(ready_r, len(items) - len(got))
    os.write(go_w, b"g" * len(items))
    results: list[dict[str, Any]] = []
    with os.fdopen(res_r, "r") as res:
        for _ in items:
            results.append(json.loads(res.readline()))
        _emit(out_fd, {"stage": "collected", "connected": got.count(b"c"), "results": results})
        if spec.get("release_fifo"):
            with open(spec["release_fifo"], "rb") as fifo:
                fifo.read(1)
        os.close(hold_w)
        for pid in pids:
            os.waitpid(pid, 0)
    _emit(out_fd, {"done": True})


def _run_probe(spec: dict[str, Any], out_fd: int) -> None:
    """Run in a forked process; writes one or more JSON lines, the last with "done"."""
    depth = spec.get("depth", 0)
    if depth > 0:
        pid = os.fork()
        if pid == 0:
            try:
                _run_probe({**spec, "depth": depth - 1}, out_fd)
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
        return
    try:
        if spec.get("mode") == "fanout":
            _fanout(spec, out_fd)
            return
        if spec.get("uid") is not None:
            drop_privileges(spec["uid"], spec["uid"])
        if str(spec.get("mode", "")).startswith("client_"):
            result = _client_exchange(spec)
        elif spec.get("mode") == "two_conns":
            result = _two_conns(spec)
        else:
            result = _raw_exchange(spec)
        result["pid"] = os.getpid()
    except BaseException as exc:
        result = {"error": repr(exc)}
    _emit(out_fd, {**result, "done": True})


def _fork_at_pid(target: int, body: Callable[[], None], keep: tuple[int, ...]) -> int | None:
    """Fork a process whose pid is exactly ``target`` (through ns_last_pid); it runs ``body``.
    Returns its pid, or None if other processes kept taking the pid."""
    for _ in range(50):
        with open("/proc/sys/kernel/ns_last_pid", "w") as f:
            f.write(str(target - 1))
        pid = os.fork()
        if pid == 0:
            if os.getpid() != target:
                os._exit(0)
            try:
                _close_fds_except(*keep)
                body()
            finally:
                os._exit(0)
        if pid == target:
            return pid
        os.waitpid(pid, 0)
    return None


def _squat(uid: int) -> None:
    """A process that sits on a pid, as the sandbox uid, until killed."""
    drop_privileges(uid, uid)
    signal.pause()


def _tree_main(cmd_r: int, res_w: int) -> None:
    """The sandbox's root process: forks one probe (its child) per command."""
    with os.fdopen(cmd_r, "r") as commands:
        for line in commands:
            spec = json.loads(line)
            if spec.get("exit"):
                return
            if "squat" in spec:
                uid = spec["uid"]
                pid = _fork_at_pid(spec["squat"], lambda: _squat(uid), ())  # noqa: B023
                _emit(res_w, {"pid": pid, "done": True})
                continue
            pid = os.fork()
            if pid == 0:
                try:
                    _run_probe(spec, res_w)
                finally:
                    os._exit(0)
            os.waitpid(pid, 0)


# --- test-side handles ---------------------------------------------------------------------


class Lines:
    """Reads JSON lines from a pipe with a timeout."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buf = b""

    def read(self, timeout: float = LINE_TIMEOUT) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.fd], [], [], left)[0]:
                raise TimeoutError("no answer from the forked process")
            chunk = os.read(self.fd, 65536)
            if not chunk:
                raise EOFError("the forked process went away")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        out: dict[str, Any] = json.loads(line)
        return out

    def until_done(self, timeout: float = LINE_TIMEOUT) -> dict[str, Any]:
        while True:
            obj = self.read(timeout)
            if obj.get("done"):
                return obj


class Tree:
    """A sandbox's process tree: its root is ``pid``; probes run as its children."""

    def __init__(self) -> None:
        cmd_r, cmd_w = os.pipe()
        res_r, res_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                os.close(cmd_w)
                os.close(res_r)
                _close_fds_except(cmd_r, res_w)
                _tree_main(cmd_r, res_w)
            finally:
                os._exit(0)
        os.close(cmd_r)
        os.close(res_w)
        self.pid = pid
        self._cmd = cmd_w
        self.lines = Lines(res_r)
        self._reaped = False

    def send(self, spec: dict[str, Any]) -> None:
        os.write(self._cmd, (json.dumps(spec) + "\n").encode())

    def run(self, spec: dict[str, Any], timeout: float = LINE_TIMEOUT) -> dict[str, Any]:
        self.send(spec)
        return self.lines.until_done(timeout)

    def close(self) -> None:
        if self._reaped:
            return
        with contextlib.suppress(OSError):
            self.send({"exit": True})
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if os.waitpid(self.pid, os.WNOHANG)[0]:
                break
            time.sleep(0.01)
        else:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        self._reaped = True
        os.close(self._cmd)
        os.close(self.lines.fd)


def outsider(spec: dict[str, Any]) -> dict[str, Any]:
    """Run a probe in a process forked from the test: NOT in any sandbox's tree."""
    res_r, res_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(res_r)
            _close_fds_except(res_w)
            _run_probe(spec, res_w)
        finally:
            os._exit(0)
    os.close(res_w)
    try:
        return Lines(res_r).until_done()
    finally:
        os.waitpid(pid, 0)
        os.close(res_r)


class Sandbox:
    def __init__(self, entry: SocketEntry, tree: Tree, uid: int, token: str) -> None:
        self.entry = entry
        self.tree = tree
        self.uid = uid
        self.token = token

    @property
    def path(self) -> str:
        return self.entry.path

    def probe(self, **spec: Any) -> dict[str, Any]:
        """A child of the sandbox's root, as the sandbox uid unless told otherwise."""
        spec.setdefault("uid", self.uid)
        spec.setdefault("path", self.path)
        spec["sends"] = [s.hex() for s in spec.get("sends", [])]
        return self.tree.run(spec)


class Harness:
    def __init__(self, root: str, **server_kw: Any) -> None:
        self.root = root
        self.violations: list[tuple[str, str]] = []
        self._vcond = threading.Condition()
        self.proxy: Callable[[str, str, Any, str], tuple[int, Any]] | None = None
        self.proxied_for: list[str] = []  # the sandbox id each proxied call was made for
        self.server = CredentialServer(
            proxy_handler=lambda s, m, p, b, t: self._proxy(s, m, p, b, t),
            on_violation=self._on_violation,
            **server_kw,
        )
        self.trees: list[Tree] = []

    def _proxy(
        self, sandbox_id: str, method: str, path: str, body: Any, token: str
    ) -> tuple[int, Any]:
        assert self.proxy is not None, "this test set no proxy handler"
        self.proxied_for.append(sandbox_id)
        return self.proxy(method, path, body, token)

    def _on_violation(self, sandbox_id: str, reason: str) -> None:
        with self._vcond:
            self.violations.append((sandbox_id, reason))
            self._vcond.notify_all()

    def wait_violation(self, count: int, timeout: float = 5.0) -> list[tuple[str, str]]:
        with self._vcond:
            self._vcond.wait_for(lambda: len(self.violations) >= count, timeout)
            return list(self.violations)

    def tree(self) -> Tree:
        t = Tree()
        self.trees.append(t)
        return t

    def sandbox(self, *, bind: bool = True, token: str | None = None, ttl: int = 600) -> Sandbox:
        uid = next(_uids)
        sid = f"sb{uid}"
        entry = self.server.open_socket(sid, directory_root=self.root, uid=uid, gid=uid)
        tree = self.tree()
        token = token or f"tok-{sid}-" + os.urandom(6).hex()
        if bind:
            entry.bind_process(tree.pid)
            entry.set_token(token, int(time.time()) + ttl)
        return Sandbox(entry, tree, uid, token)

    def close(self) -> None:
        self.server.close()
        for t in self.trees:
            t.close()


@pytest.fixture
def sockroot() -> Iterator[str]:
    # Short, so socket paths stay far below the 107-byte limit; 0711 like the supervisor's
    # sockets directory, so a sandbox uid can reach its own (0700) directory and no other.
    d = tempfile.mkdtemp(prefix="cs", dir="/tmp")
    os.chmod(d, 0o711)
    yield d
    with contextlib.suppress(OSError):
        os.rmdir(d)


@pytest.fixture
def harness(sockroot: str) -> Iterator[Harness]:
    h = Harness(sockroot)
    yield h
    h.close()


def state_of(entry: SocketEntry) -> SandboxState:
    """(A call, so a type checker does not carry one assert's narrowing to the next.)"""
    return entry.state


def only_reply(result: dict[str, Any]) -> dict[str, Any]:
    assert "error" not in result, result
    (reply,) = result["replies"]
    out: dict[str, Any] = reply
    return out


def assert_got_nothing(result: dict[str, Any]) -> None:
    """The connection was closed on us, and not one byte came back."""
    assert "error" not in result, result
    if "connect_errno" in result:
        return
    last = result["replies"][-1]
    assert last["kind"] in ("eof", "send_error"), result
    assert last.get("bytes", 0) == 0, result


# --- the happy path ------------------------------------------------------------------------


def test_descendant_with_sandbox_uid_gets_the_token(harness: Harness) -> None:
    sb = harness.sandbox()
    reply = only_reply(sb.probe(sends=[TOKEN_REQ]))
    assert reply["kind"] == "frame"
    assert reply["obj"]["type"] == "token"
    assert reply["obj"]["token"] == sb.token
    # Deeper in the tree, and through the real client SDK.
    deep = sb.probe(depth=3, mode="client_token")
    assert deep["token"] == sb.token
    assert sb.entry.counters.tokens_served == 2
    assert sb.entry.counters.peer_rejected == 0


def test_many_requests_on_one_connection_and_a_refreshed_token(harness: Harness) -> None:
    sb = harness.sandbox()
    result = sb.probe(sends=[TOKEN_REQ, TOKEN_REQ, TOKEN_REQ])
    assert [r["obj"]["token"] for r in result["replies"]] == [sb.token] * 3
    assert sb.entry.set_token("tok-refreshed", int(time.time()) + 60)
    assert only_reply(sb.probe(sends=[TOKEN_REQ]))["obj"]["token"] == "tok-refreshed"


def test_socket_directory_and_file_belong_to_the_sandbox_uid(harness: Harness) -> None:
    sb = harness.sandbox()
    d = os.lstat(sb.entry.directory)
    s = os.lstat(sb.path)
    assert stat.S_ISDIR(d.st_mode) and stat.S_IMODE(d.st_mode) == 0o700
    assert (d.st_uid, d.st_gid) == (sb.uid, sb.uid)
    assert stat.S_ISSOCK(s.st_mode) and stat.S_IMODE(s.st_mode) == 0o600
    assert (s.st_uid, s.st_gid) == (sb.uid, sb.uid)
    assert sb.path == os.path.join(harness.root, sb.entry.sandbox_id, "cred.sock")
    harness.server.close_socket(sb.entry.sandbox_id)
    assert not os.path.exists(sb.entry.directory)
    harness.server.close_socket(sb.entry.sandbox_id)  # idempotent


def test_uid_given_only_at_bind_hands_the_directory_over_then(harness: Harness) -> None:
    """The process backend picks the uid at launch: open_socket cannot know it yet."""
    uid = next(_uids)
    entry = harness.server.open_socket(f"late{uid}", directory_root=harness.root)
    assert os.lstat(entry.directory).st_uid == 0
    assert os.lstat(entry.path).st_uid == 0
    tree = harness.tree()
    entry.bind_process(tree.pid, uid, uid)
    entry.set_token("tok-late", int(time.time()) + 60)
    assert os.lstat(entry.directory).st_uid == uid
    assert os.lstat(entry.path).st_uid == uid
    sb = Sandbox(entry, tree, uid, "tok-late")
    assert only_reply(sb.probe(sends=[TOKEN_REQ]))["obj"]["token"] == "tok-late"


def test_open_socket_refuses_a_writable_root_and_a_bad_id(harness: Harness) -> None:
    loose = tempfile.mkdtemp(prefix="csl", dir="/tmp")
    try:
        os.chmod(loose, 0o777)
        with pytest.raises(PermissionError, match="not writable by group or others"):
            harness.server.open_socket("x1", directory_root=loose, uid=120_999)
    finally:
        os.rmdir(loose)
    for bad in ("../x", "a/b", "", ".hidden"):
        with pytest.raises(ValueError, match="safe identifier"):
            harness.server.open_socket(bad, directory_root=harness.root, uid=120_999)
    harness.server.open_socket("dup", directory_root=harness.root, uid=120_999)
    with pytest.raises(ValueError, match="already has"):
        harness.server.open_socket("dup", directory_root=harness.root, uid=120_999)


# --- peer checks ---------------------------------------------------------------------------


def test_another_uid_in_the_tree_gets_nothing(harness: Harness) -> None:
    sb = harness.sandbox()
    other = next(_uids)
    # With the real permissions the other uid cannot even reach the socket...
    blocked = sb.probe(uid=other, sends=[TOKEN_REQ])
    assert blocked.get("connect_errno") == errno.EACCES
    # ...and if it could (permissions opened up), the peer check still refuses it.
    os.chmod(sb.entry.directory, 0o711)
    os.chmod(sb.path, 0o666)
    result = sb.probe(uid=other, sends=[TOKEN_REQ])
    assert "connect_errno" not in result
    assert_got_nothing(result)
    # Root itself, in the tree, is not the sandbox uid either.
    assert_got_nothing(sb.probe(uid=None, sends=[TOKEN_REQ]))
    assert sb.entry.counters.peer_rejected == 2
    assert sb.entry.counters.tokens_served == 0
    assert harness.violations == []


def test_right_uid_outside_the_tree_gets_nothing(harness: Harness) -> None:
    sb = harness.sandbox()
    result = outsider({"uid": sb.uid, "path": sb.path, "sends": [TOKEN_REQ.hex()]})
    assert "connect_errno" not in result  # the filesystem let it in; the peer check did not
    assert_got_nothing(result)
    # A sibling sandbox's tree is "outside" too, even with this sandbox's uid.
    other = harness.sandbox()
    assert_got_nothing(other.probe(uid=sb.uid, path=sb.path, sends=[TOKEN_REQ]))
    assert sb.entry.counters.peer_rejected == 2
    assert harness.violations == []


def test_a_new_process_on_the_dead_roots_pid_is_not_the_root(harness: Harness) -> None:
    """bind_process(pid); the root exits; a new process gets the very same pid."""
    sb = harness.sandbox()
    assert only_reply(sb.probe(sends=[TOKEN_REQ]))["obj"]["token"] == sb.token
    old = sb.tree.pid
    sb.tree.close()

    # (a) the impostor on the root's pid connects itself, as the sandbox uid
    res_r, res_w = os.pipe()
    spec = {"uid": sb.uid, "path": sb.path, "sends": [TOKEN_REQ.hex()]}
    pid = _fork_at_pid(old, lambda: _run_probe(spec, res_w), (res_w,))
    os.close(res_w)
    if pid is None:
        _cannot_set_up("could not get the old pid back from ns_last_pid")
    result = Lines(res_r).until_done()
    os.waitpid(pid, 0)
    os.close(res_r)
    assert result["pid"] == old
    assert_got_nothing(result)

    # (b) a child of an impostor root (a whole new tree on the old pid) connects
    cmd_r, cmd_w = os.pipe()
    res_r, res_w = os.pipe()
    pid = _fork_at_pid(old, lambda: _tree_main(cmd_r, res_w), (cmd_r, res_w))
    os.close(cmd_r)
    os.close(res_w)
    if pid is None:
        _cannot_set_up("could not get the old pid back from ns_last_pid")
    os.write(cmd_w, (json.dumps({**spec, "depth": 1}) + "\n").encode())
    result = Lines(res_r).until_done()
    os.write(cmd_w, b'{"exit": true}\n')
    os.waitpid(pid, 0)
    os.close(cmd_w)
    os.close(res_r)
    assert_got_nothing(result)
    assert sb.entry.counters.peer_rejected == 2
    assert sb.entry.counters.tokens_served == 1


@pytest.mark.parametrize("guard", ["so_peerpidfd", "pidfd_open_and_start_time", "none"])
def test_the_connecting_pid_reused_by_a_tree_process_gets_nothing(
    harness: Harness, monkeypatch: pytest.MonkeyPatch, guard: str
) -> None:
    """An outsider connects, hands the socket to its child and exits; a process of the
    sandbox's tree is then born on the outsider's pid. SO_PEERCRED still names that pid.

    ``none`` disables the connecting-pid guard to show the attack is real: then it works.
    """
    if guard == "so_peerpidfd" and peercheck._SO_PEERPIDFD is None:
        _cannot_set_up("no SO_PEERPIDFD on this architecture")
    if guard != "so_peerpidfd":
        monkeypatch.setattr(peercheck, "_SO_PEERPIDFD", None)
    if guard == "none":

        def unguarded(sock: socket.socket, pid: int, accepted_ticks: int) -> int:
            return os.pidfd_open(pid)

        monkeypatch.setattr(peercheck, "_peer_pidfd", unguarded)
    sb = harness.sandbox(bind=False)
    uid = sb.uid
    go_r, go_w = os.pipe()
    res_r, res_w = os.pipe()
    outer = os.fork()
    if outer == 0:
        try:
            _close_fds_except(go_r, res_w)
            drop_privileges(uid, uid)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(sb.path)
            if os.fork() == 0:  # the accomplice keeps the connection
                try:
                    sock.settimeout(5.0)
                    os.read(go_r, 1)
                    try:
                        sock.sendall(TOKEN_REQ)
                        reply = _read_reply(sock)
                    except OSError:  # already closed on us: EPIPE
                        reply = {"kind": "eof", "bytes": 0}
                    _emit(res_w, {**reply, "done": True})
                finally:
                    os._exit(0)
        finally:
            os._exit(0)
    os.close(go_r)
    os.close(res_w)
    os.waitpid(outer, 0)  # the connecting process is gone; its pid is free
    time.sleep(0.1)  # more than a clock tick after the accept
    squatter = sb.tree.run({"squat": outer, "uid": uid})["pid"]
    if squatter is None:
        _cannot_set_up("could not get the outsider's pid back from ns_last_pid")
    try:
        assert peercheck.read_stat(squatter).ppid == sb.tree.pid
        sb.entry.bind_process(sb.tree.pid)  # the parked connection is checked now
        sb.entry.set_token(sb.token, int(time.time()) + 60)
        os.write(go_w, b"g")
        result = Lines(res_r).until_done()
    finally:
        os.kill(squatter, signal.SIGKILL)
        os.close(go_w)
        os.close(res_r)
    if guard == "none":
        assert result["kind"] == "frame" and result["obj"]["token"] == sb.token
        return
    assert result == {"kind": "eof", "bytes": 0, "done": True}
    assert sb.entry.counters.peer_rejected == 1


def test_a_fake_parent_in_comm_does_not_fool_the_stat_parser() -> None:
    """``comm`` is the process's to choose; the walk must read the kernel's ppid, not one
    smuggled into the name (the classic ``/proc/<pid>/stat`` parsing bug)."""
    ready_r, ready_w = os.pipe()
    done_r, done_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            with open("/proc/self/comm", "w") as f:
                f.write("x) S 1 1 1 1 (")
            os.write(ready_w, b"k")
            os.read(done_r, 1)
        finally:
            os._exit(0)
    try:
        assert os.read(ready_r, 1) == b"k"
        st = peercheck.read_stat(pid)
        assert st.ppid == os.getpid()
        assert st.state in ("S", "R")
    finally:
        os.write(done_w, b"x")
        os.waitpid(pid, 0)
        for fd in (ready_r, ready_w, done_r, done_w):
            os.close(fd)


def _scripted_proc(
    monkeypatch: pytest.MonkeyPatch, table: dict[int, tuple[int, int]]
) -> peercheck.ProcessRecord:
    """Script /proc: ``table`` maps pid -> (ppid, start_ticks); the root is pid 100."""

    def fake_stat(pid: int) -> peercheck.ProcStat:
        if pid not in table:
            raise ProcessLookupError(pid)
        ppid, start = table[pid]
        return peercheck.ProcStat(pid=pid, ppid=ppid, start_ticks=start, state="S")

    monkeypatch.setattr(peercheck, "read_stat", fake_stat)
    return peercheck.ProcessRecord(100, table[100][1], None)


def test_walk_rejects_an_ancestor_younger_than_its_child(monkeypatch: pytest.MonkeyPatch) -> None:
    """A walk step onto a pid that was freed and reused reaches a process born after the
    child it came from: no real parent is younger than its child."""
    root = _scripted_proc(
        monkeypatch, {100: (1, 1000), 200: (100, 1100), 300: (200, 1200), 400: (300, 1300)}
    )
    peercheck._walk_to_root(400, root)  # a sound chain passes
    _scripted_proc(monkeypatch, {100: (1, 1000), 200: (100, 1500), 300: (200, 1200)})
    with pytest.raises(peercheck.PeerRejected, match="reused"):
        peercheck._walk_to_root(300, root)
    _scripted_proc(monkeypatch, {100: (1, 1300), 300: (100, 1200)})
    with pytest.raises(peercheck.PeerRejected, match="younger"):
        peercheck._walk_to_root(300, peercheck.ProcessRecord(100, 1300, None))
    _scripted_proc(monkeypatch, {100: (1, 1000), 500: (1, 1200)})
    with pytest.raises(peercheck.PeerRejected, match="not in the sandbox"):
        peercheck._walk_to_root(500, root)
    _scripted_proc(monkeypatch, {100: (1, 1000), 600: (700, 1200), 700: (600, 1200)})
    with pytest.raises(peercheck.PeerRejected, match="ancestors"):
        peercheck._walk_to_root(600, root)


# --- the state table -----------------------------------------------------------------------


def test_state_table_shape() -> None:
    assert ALLOWED[SandboxState.WAITING] == {}
    assert set(ALLOWED[SandboxState.RUNNING]) == {TokenRequest, ProxyRequest}
    assert set(ALLOWED[SandboxState.ENDED]) == {TokenRequest}


@pytest.mark.parametrize("order", ["bind_first", "token_first"])
def test_waiting_parks_the_connection_until_process_and_token(harness: Harness, order: str) -> None:
    """A child that connects before the supervisor has called bind_process and set_token
    waits, unread, and is then checked and served, whichever call comes first."""
    sb = harness.sandbox(bind=False)
    sb.tree.send({"uid": sb.uid, "path": sb.path, "sends": [TOKEN_REQ.hex()], "timeout": 10.0})
    with pytest.raises(TimeoutError):
        sb.tree.lines.read(timeout=0.5)  # nothing answered while WAITING
    if order == "bind_first":
        sb.entry.bind_process(sb.tree.pid)
    else:
        sb.entry.set_token(sb.token, int(time.time()) + 60)
    with pytest.raises(TimeoutError):
        sb.tree.lines.read(timeout=0.3)  # still one of the two missing
    if order == "bind_first":
        with pytest.raises(RuntimeError, match="already bound"):
            sb.entry.bind_process(sb.tree.pid)
    assert state_of(sb.entry) is SandboxState.WAITING
    if order == "bind_first":
        sb.entry.set_token(sb.token, int(time.time()) + 60)
    else:
        sb.entry.bind_process(sb.tree.pid)
    assert state_of(sb.entry) is SandboxState.RUNNING
    result = sb.tree.lines.until_done()
    assert only_reply(result)["obj"]["token"] == sb.token
    with pytest.raises(RuntimeError, match="cannot bind"):
        sb.entry.bind_process(sb.tree.pid)


def test_waiting_connections_time_out_and_never_bound_is_refused(sockroot: str) -> None:
    h = Harness(sockroot, idle_timeout=0.5)
    try:
        sb = h.sandbox(bind=False)
        result = sb.probe(sends=[TOKEN_REQ])
        assert_got_nothing(result)
        assert 0.4 < result["elapsed"] < 5
        assert sb.entry.counters.timeouts == 1
        sb.entry.end()  # ended without ever being bound: nobody can be checked
        assert_got_nothing(sb.probe(sends=[TOKEN_REQ]))
        assert sb.entry.counters.peer_rejected == 1
        assert h.violations == []
    finally:
        h.close()


def test_ended_answers_no_token_and_keeps_no_token(harness: Harness) -> None:
    sb = harness.sandbox()
    sb.entry.end()
    reply = only_reply(sb.probe(sends=[TOKEN_REQ]))["obj"]
    assert reply["type"] == "error" and reply["code"] == "no_token"
    assert sb.entry.set_token("tok-too-late", int(time.time()) + 60) is False
    assert only_reply(sb.probe(sends=[TOKEN_REQ]))["obj"]["code"] == "no_token"
    assert harness.violations == []
    with pytest.raises(RuntimeError, match="cannot bind"):
        sb.entry.bind_process(sb.tree.pid)


def test_an_expired_token_is_a_refusal(harness: Harness) -> None:
    sb = harness.sandbox(token="tok-old", ttl=-1)
    reply = sb.probe(mode="client_token")
    assert reply["exc"] == "Refused" and reply["code"] == "no_token"
    assert "expired" in reply["msg"] and "tok-old" not in reply["msg"]


BAD_FRAMES: dict[str, tuple[list[bytes], bool]] = {
    # name: (what is sent, half-close after sending)
    "oversized_header": ([_HEADER.pack(2 * 1024 * 1024)], False),
    "just_over_max_frame": ([_HEADER.pack(MAX_FRAME + 1)], False),
    "truncated_frame": ([_HEADER.pack(100) + b'{"type": "tok'], True),
    "truncated_header": ([b"\x00\x00"], True),
    "empty_frame": ([_HEADER.pack(0)], False),
    "unknown_type": ([frame({"type": "bogus"})], False),
    "reply_type_from_child": ([frame({"type": "token", "token": "x", "expires_at": 1})], False),
    "extra_field": ([frame({"type": "token", "scope": "admin"})], False),
    "not_json": ([raw_frame(b"\xff\xfe not json")], False),
    "json_array": ([raw_frame(b'["token"]')], False),
    "duplicate_key": ([raw_frame(b'{"type": "token", "type": "token"}')], False),
    "nan": ([raw_frame(b'{"type": "proxy", "method": "GET", "path": NaN, "body": 1}')], False),
    "proxy_operator_route": (
        [frame({"type": "proxy", "method": "GET", "path": "/v1/operator/runs", "body": None})],
        False,
    ),
    "proxy_dotdot": (
        [frame({"type": "proxy", "method": "GET", "path": "/v1/task/%2e%2e/x", "body": None})],
        False,
    ),
    "proxy_bad_method": (
        [frame({"type": "proxy", "method": "PATCH", "path": "/v1/task/context", "body": None})],
        False,
    ),
    "good_then_bad": ([TOKEN_REQ, frame({"type": "bogus"})], False),
}


def _out_of_turn(h: Harness, sb: Sandbox, sends: list[bytes], shut_wr: bool) -> None:
    before = len(h.violations)
    result = sb.probe(sends=sends, shut_wr=shut_wr)
    assert "error" not in result, result
    last = result["replies"][-1]
    assert last["kind"] in ("eof", "send_error") and last.get("bytes", 0) == 0, result
    violations = h.wait_violation(before + 1)
    assert len(violations) == before + 1
    assert violations[-1][0] == sb.entry.sandbox_id
    # The sandbox is done for: no token any more, even before the supervisor's kill lands.
    assert sb.entry.state is SandboxState.ENDED
    assert sb.entry.set_token("tok-after-violation", int(time.time()) + 60) is False
    # The one thread serves on: another sandbox still gets its token.
    other = h.sandbox()
    assert only_reply(other.probe(sends=[TOKEN_REQ]))["obj"]["token"] == other.token


@pytest.mark.parametrize("name", sorted(BAD_FRAMES))
@pytest.mark.parametrize("state", [SandboxState.RUNNING, SandboxState.ENDED])
def test_speaking_out_of_turn_drops_and_reports(
    harness: Harness, state: SandboxState, name: str
) -> None:
    sb = harness.sandbox()
    if state is SandboxState.ENDED:
        sb.entry.end()
    sends, shut_wr = BAD_FRAMES[name]
    _out_of_turn(harness, sb, sends, shut_wr)
    assert sb.entry.counters.violations == 1


@pytest.mark.parametrize("state", [SandboxState.RUNNING, SandboxState.ENDED])
def test_every_request_type_a_state_does_not_allow(harness: Harness, state: SandboxState) -> None:
    requests_by_type = {TokenRequest: TOKEN_REQ, ProxyRequest: PROXY_REQ}
    harness.proxy = lambda m, p, b, t: (200, {"ok": True})
    disallowed = [t for t in requests_by_type if t not in ALLOWED[state]]
    if state is SandboxState.RUNNING:
        assert disallowed == []
    for kind in disallowed:
        sb = harness.sandbox()
        if state is SandboxState.ENDED:
            sb.entry.end()
        _out_of_turn(harness, sb, [requests_by_type[kind]], False)
        assert "not allowed while ended" in harness.violations[-1][1]


def test_a_violation_closes_the_sandboxs_other_connections(harness: Harness) -> None:
    """One connection is checked and served; a second one of the same sandbox speaks out of
    turn; the first is then closed too, and the token is gone."""
    sb = harness.sandbox()
    result = sb.probe(mode="two_conns", bad=frame({"type": "bogus"}).hex())
    assert "error" not in result, result
    served, bad, after = result["replies"]
    assert served["obj"]["token"] == sb.token
    assert bad == {"kind": "eof", "bytes": 0}
    assert after["kind"] in ("eof", "send_error") and after.get("bytes", 0) == 0
    assert harness.wait_violation(1)[0][0] == sb.entry.sandbox_id
    assert sb.entry.state is SandboxState.ENDED


def test_server_side_proxy_path_check_holds_without_the_parser(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Even if parse_request let a path through, the server re-checks it before forwarding."""
    called: list[str] = []

    def recording(method: str, path: str, body: Any, token: str) -> tuple[int, Any]:
        called.append(path)
        return 200, None

    harness.proxy = recording

    strict_parse = parse_request

    def lax_parse(obj: dict[str, Any]) -> Any:
        if obj.get("type") != "proxy":
            return strict_parse(obj)
        req = object.__new__(ProxyRequest)
        for k in ("method", "path", "body", "type"):
            object.__setattr__(req, k, obj[k])
        return req

    monkeypatch.setattr(credconn, "parse_request", lax_parse)
    sb = harness.sandbox()
    bad = frame({"type": "proxy", "method": "GET", "path": "/v1/operator/runs", "body": None})
    _out_of_turn(harness, sb, [bad], False)
    assert called == []
    assert "proxy refused" in harness.violations[-1][1]


def test_connect_and_say_nothing_is_dropped(sockroot: str) -> None:
    h = Harness(sockroot, idle_timeout=0.5)
    try:
        sb = h.sandbox()
        result = sb.probe()  # connects, sends nothing, reads
        assert_got_nothing(result)
        assert 0.4 < result["elapsed"] < 5
        # A frame started and never finished is dropped the same way (and is not a kill).
        result = sb.probe(sends=[_HEADER.pack(50) + b'{"ty'])
        assert_got_nothing(result)
        assert sb.entry.counters.timeouts == 2
        assert h.violations == []
    finally:
        h.close()


def test_connections_per_sandbox_are_capped(sockroot: str, caplog: Any) -> None:
    caplog.set_level(logging.WARNING, logger="privsep")
    h = Harness(sockroot, max_connections=4)
    try:
        sb = h.sandbox()
        items = [{"uid": sb.uid, "path": sb.path}] * 6
        sb.tree.send({"mode": "fanout", "items": items})
        collected = sb.tree.lines.read()
        sb.tree.lines.until_done()
        kinds = sorted(r["kind"] for r in collected["results"])
        assert kinds == ["eof", "eof", "frame", "frame", "frame", "frame"]
        assert sb.entry.counters.over_capacity == 2
        # Counted every time, logged once a second: a connect loop cannot flood the log.
        assert caplog.text.count("already 4 open") == 1
    finally:
        h.close()


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
