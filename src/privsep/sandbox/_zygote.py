"""The template zygote: a warm interpreter that forks one sandbox per request.

Started by the supervisor as ``python -I -m privsep.sandbox._zygote CTL_FD PARENT_PID [MODULES]``
with an empty environment, so it never holds a secret: it only ever sees launch plans (which
carry none) and the two pipe ends of each request. It imports the client SDK and common
modules once, freezes the garbage collector's view of them (``gc.freeze()``, so children do not
dirty the shared pages by collecting them), and then forks.

Protocol on the ``SOCK_SEQPACKET`` control socket (one message per datagram, marshal):

* zygote → supervisor, once: ``("ready", pid)``;
* supervisor → zygote: ``(request_id, plan_bytes)`` with two or three fds (SCM_RIGHTS): the
  child's output pipe, its status pipe and, for a pre-warmed child, the pipe its launch
  request will arrive on;
* zygote → supervisor: ``(request_id, pid, error)`` with the child's pidfd, opened before
  the child can be reaped, so the supervisor never holds a pidfd to a recycled pid.

The zygote reaps its children itself. When the control socket closes it stops accepting and
exits once its last child is gone; if the supervisor dies it gets ``SIGKILL``
(``PR_SET_PDEATHSIG``), and so, in a chain, does every sandbox.
"""

from __future__ import annotations

import array
import gc
import marshal
import os
import select
import signal
import socket
import sys
from typing import NoReturn

from privsep.sandbox import _child
from privsep.sandbox import _libc as libc
from privsep.sandbox._wire import Plan

DEFAULT_PRELOAD = (
    "privsep.client",
    "privsep.sandbox.entrypoints",
    "asyncio",
    "base64",
    "collections",
    "contextlib",
    "dataclasses",
    "datetime",
    "functools",
    "hashlib",
    "json",
    "logging",
    "pathlib",
    "re",
    "runpy",
    "traceback",
    "typing",
    "uuid",
)
MAX_MESSAGE = 1 << 20
_FD_SPACE = socket.CMSG_SPACE(3 * array.array("i").itemsize)


def main(argv: list[str]) -> NoReturn:
    """Bootstrap, preload, then serve until a forked child returns here."""
    ctl_fd, parent = int(argv[1]), int(argv[2])
    libc.set_pdeathsig(signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(70)
    libc.set_dumpable(False)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    # Nothing but stdio and the control socket, even if the supervisor leaked an fd.
    if ctl_fd > 3:  # never an empty range: closerange(3, 3) would close every fd
        os.closerange(3, ctl_fd)
    os.closerange(ctl_fd + 1, 1 << 16)
    modules = argv[3].split(",") if len(argv) > 3 and argv[3] else list(DEFAULT_PRELOAD)
    for name in modules:
        try:
            __import__(name)
        except Exception:  # noqa: S112 - a missing optional module must not stop the zygote
            continue
    gc.disable()
    gc.collect()
    gc.freeze()
    ctl = socket.socket(fileno=ctl_fd)
    ctl.send(marshal.dumps(("ready", os.getpid())))
    plan, status_fd, request_fd = _serve(ctl)
    gc.enable()
    _child.run(plan, status_fd, request_fd)


def _serve(ctl: socket.socket) -> tuple[Plan, int, int]:
    """Fork per request. Returns only in a child: its plan, status fd and request fd (or -1)."""
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    children: set[int] = set()
    accepting = True
    while accepting or children:
        watch: list[int] = [ctl.fileno(), wake_r] if accepting else [wake_r]
        ready, _, _ = select.select(watch, [], [])
        if wake_r in ready:
            _drain(wake_r)
            _reap(children)
        if not accepting or ctl.fileno() not in ready:
            continue
        msg, ancdata, flags, _ = ctl.recvmsg(MAX_MESSAGE, _FD_SPACE)
        fds = _received_fds(ancdata)
        if not msg:
            accepting = False
            ctl.close()
            continue
        try:
            request_id, plan_bytes = marshal.loads(msg)  # noqa: S302 - from the supervisor
            plan = Plan.from_wire(plan_bytes)
            if len(fds) not in (2, 3) or flags & socket.MSG_CTRUNC:
                raise ValueError(f"expected 2 or 3 fds, got {len(fds)}")
        except (ValueError, TypeError, EOFError) as exc:
            for fd in fds:
                os.close(fd)
            ctl.send(marshal.dumps((None, 0, f"bad request: {exc}")))
            continue
        plan.parent_pid = os.getpid()
        pid = os.fork()
        if pid == 0:
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            ctl.close()
            os.close(wake_r)
            os.close(wake_w)
            out_w, status_w = fds[:2]
            os.dup2(out_w, 1)
            os.dup2(out_w, 2)
            os.close(out_w)
            return plan, status_w, fds[2] if len(fds) == 3 else -1
        children.add(pid)
        for fd in fds:
            os.close(fd)
        pidfd = os.pidfd_open(pid)
        try:
            ctl.sendmsg(
                [marshal.dumps((request_id, pid, ""))],
                [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [pidfd]))],
            )
        finally:
            os.close(pidfd)
    os._exit(0)


def _received_fds(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds = array.array("i")
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - (len(data) % fds.itemsize)])
    return list(fds)


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass


def _reap(children: set[int]) -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        children.discard(pid)


if __name__ == "__main__":
    main(sys.argv)
