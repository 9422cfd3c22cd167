"""Supervisor side of template mode: start the zygote, send it launch requests.

The zygote is exec'd (never forked from the supervisor, whose memory may hold secrets) with an
empty environment, from the backend's long-lived launcher thread so its ``PR_SET_PDEATHSIG``
stays tied to the backend's lifetime rather than to whichever thread asked first. Requests are
serialised by a lock: each is one datagram out and one back, a fork's worth of time.
"""

from __future__ import annotations

import array
import contextlib
import marshal
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor

from privsep.sandbox._spawn import devnull_fd, spawn_python

_REPLY_SPACE = socket.CMSG_SPACE(array.array("i").itemsize)


class ZygoteError(RuntimeError):
    """The zygote could not be started or did not answer."""


class ZygoteClient:
    """Owns one zygote process and talks to it."""

    def __init__(
        self,
        *,
        python: str,
        launcher: Executor,
        preload: Sequence[str] | None,
        start_timeout: float = 60.0,
        request_timeout: float = 10.0,
    ) -> None:
        self._python = python
        self._launcher = launcher
        self._preload = preload
        self._start_timeout = start_timeout
        self._request_timeout = request_timeout
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._pid: int | None = None
        self._seq = 0

    @property
    def pid(self) -> int | None:
        """The running zygote's pid, if started."""
        return self._pid

    def start(self) -> None:
        """Start the zygote now (otherwise the first launch does)."""
        with self._lock:
            self._ensure_started()

    def launch(self, plan_bytes: bytes, fds: list[int]) -> tuple[int, int]:
        """Fork one child with ``fds`` (output, status[, request]); returns pid and a pidfd."""
        with self._lock:
            for attempt in (1, 2):
                self._ensure_started()
                try:
                    return self._request(plan_bytes, fds)
                except (OSError, EOFError, ZygoteError) as exc:
                    if isinstance(exc, ZygoteError) and "refused" in str(exc):
                        raise
                    self._discard()
                    if attempt == 2:
                        raise ZygoteError(f"template zygote failed: {exc}") from None
            raise AssertionError("unreachable")

    def close(self, timeout: float = 5.0) -> None:
        """Close the control socket; the zygote exits once its children are gone."""
        with self._lock:
            sock, pid = self._sock, self._pid
            self._sock = self._pid = None
        if sock is not None:
            sock.close()
        if pid is not None:
            _reap(pid, timeout)

    def _request(self, plan_bytes: bytes, fds: list[int]) -> tuple[int, int]:
        if self._sock is None:
            raise ZygoteError("zygote not started")
        self._seq += 1
        request_id = self._seq
        self._sock.sendmsg(
            [marshal.dumps((request_id, plan_bytes))],
            [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))],
        )
        msg, ancdata, _, _ = self._sock.recvmsg(4096, _REPLY_SPACE)
        got = array.array("i")
        for level, kind, data in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                got.frombytes(data[: len(data) - (len(data) % got.itemsize)])
        if not msg:
            raise EOFError("zygote closed its control socket")
        reply_id, pid, error = marshal.loads(msg)  # noqa: S302 - our own zygote
        if error or reply_id != request_id or len(got) != 1:
            for fd in got:
                os.close(fd)
            raise ZygoteError(f"zygote refused the request: {error or 'mismatched reply'}")
        return int(pid), got[0]

    def _ensure_started(self) -> None:
        if self._sock is not None:
            return
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            argv = ["-m", "privsep.sandbox._zygote", "3", str(os.getpid())]
            if self._preload is not None:
                argv.append(",".join(self._preload))
            null = devnull_fd()
            spawn: Callable[[], int] = lambda: spawn_python(  # noqa: E731
                self._python, argv, {0: null, 1: null, 2: 2, 3: theirs.fileno()}
            )
            try:
                pid = self._launcher.submit(spawn).result()
            finally:
                os.close(null)
        finally:
            theirs.close()
        ours.settimeout(self._start_timeout)
        try:
            hello = ours.recv(4096)
            kind, zpid = marshal.loads(hello)  # noqa: S302 - our own zygote
            if kind != "ready" or zpid != pid:
                raise ZygoteError(f"unexpected hello from the zygote: {hello!r}")
        except (OSError, EOFError, ValueError, TypeError) as exc:
            ours.close()
            _reap(pid, 1.0)
            raise ZygoteError(f"template zygote did not start: {exc}") from None
        ours.settimeout(self._request_timeout)
        self._sock, self._pid = ours, pid

    def _discard(self) -> None:
        sock, pid = self._sock, self._pid
        self._sock = self._pid = None
        if sock is not None:
            sock.close()
        if pid is not None:
            _reap(pid, 1.0)


def _reap(pid: int, timeout: float) -> None:
    """Wait for our zygote; SIGKILL it after ``timeout`` (its children die with it)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return
        if done:
            return
        if time.monotonic() >= deadline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
            return
        time.sleep(0.01)
