"""What the credential-socket tests share: frames, the code that runs in forked processes
(no logging, no pytest, ``os._exit`` only), the test-side handles on real process trees, and
the fixtures. The tests themselves are in ``test_credsock.py`` (the happy path, peer checks,
the state table) and ``test_credsock_proxy.py`` (the proxy, the real sandbox backend, scale and
secrecy); their module docstrings say what is attacked and how.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import select
import signal
import socket
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

import pytest

from privsep.client._exceptions import PrivsepError
from privsep.client._transport import ProxyTransport, SocketChannel, TokenSource
from privsep.runner.supervisor.credsock import (
    CredentialServer,
    SandboxState,
    SocketEntry,
)
from privsep.sandbox.privdrop import drop_privileges


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
