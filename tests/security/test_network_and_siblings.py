"""Sandboxes reach neither the supervisor's sockets nor each other."""

from __future__ import annotations

import os
import secrets
import socket
from pathlib import Path

import psutil
from hostile_kit import Hostile

from privsep.sandbox import ExitReason


def test_abstract_unix_socket_is_unreachable(hostile: Hostile) -> None:
    name = f"privsep-test-{secrets.token_hex(4)}"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind("\0" + name)
    server.listen(1)
    server.setblocking(False)
    try:
        out = hostile.run("connect_abstract", name)
        assert out.report["abstract"] == "ECONNREFUSED"  # a different network namespace
        try:
            server.accept()
            raise AssertionError("the sandbox connected to the abstract socket")
        except BlockingIOError:
            pass
    finally:
        server.close()


def _listener() -> socket.socket:
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.setblocking(False)
    return server


def test_tcp_to_the_server_port_fails_with_network_none(hostile: Hostile) -> None:
    server = _listener()
    try:
        port = str(server.getsockname()[1])
        out = hostile.run("connect_tcp", port)
        assert out.report["tcp"] == "ECONNREFUSED"  # its own loopback, nothing listening
        try:
            server.accept()
            raise AssertionError("the sandbox reached the supervisor's TCP port")
        except BlockingIOError:
            pass
        # Control: the same probe with network "host" does connect, so the test can see it.
        control = hostile.run("connect_tcp", port, network="host")
        assert control.report["tcp"] == "connected"
    finally:
        server.close()


def _user_pid(handle_pid: int, uid: int | None) -> int:
    """The sandbox's user process: the handle's process itself, or its one child (a monitor's)."""
    proc = psutil.Process(handle_pid)
    children = proc.children()
    assert len(children) <= 1
    user = children[0] if children else proc
    assert uid is not None and user.uids().real == uid
    return int(user.pid)


def test_cannot_signal_or_read_a_sibling(hostile: Hostile, workroot: Path) -> None:
    sibling = hostile.start("sleep", "30")
    assert sibling.wait_running(30)
    sibling_wd = Path(sibling.spec.workdir)
    (sibling_wd / "private.txt").write_text("sibling data")
    assert sibling.pid is not None
    user_pid = _user_pid(sibling.pid, sibling.uid)
    out = hostile.run("signal_pids", str(sibling.pid), str(user_pid), str(os.getpid()))
    for key, value in out.report.items():
        assert value == "ESRCH", (key, value)  # not even visible from its PID namespace
    files = hostile.run("read_files", str(sibling_wd), str(sibling_wd / "private.txt"))
    assert files.report == {str(sibling_wd): "ENOENT", str(sibling_wd / "private.txt"): "ENOENT"}
    # And without the mount namespace, plain permissions would still stop it (0700, other uid).
    st = sibling_wd.stat()
    assert (st.st_uid, st.st_mode & 0o777) == (sibling.uid, 0o700)
    assert sibling.uid != out.handle.uid
    assert sibling.status is None
    sibling.kill(grace=0)
    status = sibling.wait(30)
    assert status is not None and status.reason is ExitReason.KILLED


def test_double_fork_daemon_dies_with_the_sandbox(hostile_any: Hostile) -> None:
    out = hostile_any.run("double_fork")
    assert out.status.ok and out.report == {"daemon_left": True}
    uid = out.handle.uid
    left = [
        p.pid for p in psutil.process_iter(["uids"]) if p.info["uids"] and uid in p.info["uids"]
    ]
    assert left == []
