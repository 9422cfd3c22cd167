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

Process layout. As root (pool uids, no user namespace) the zygote is each sandbox's monitor
itself, so a sandbox is one process::

    zygote ── user process (PID 1 of a new PID namespace, sandbox uid, seccomp)

The zygote calls ``unshare(CLONE_NEWPID)`` right before ``fork()``, so the child is PID 1 of a
fresh PID namespace, then ``setns()`` back into its own PID namespace (a second unshare would
fail with EINVAL while the first namespace is still pending for children). It keeps the
child's status pipe, reaps it with ``wait4`` and writes the ``X`` record (raw wait status,
CPU time, peak RSS). The child's ``getppid()`` is 0 in its namespace, so it checks that the
zygote is alive through the *lifeline*: a pipe whose only write end the zygote holds, and
which reads EOF in every child once the zygote is gone. A separate monitor process (see
``_enter``) is kept in user-namespace and unsafe-inline mode, where the zygote cannot create
the PID namespace for the child.

The zygote reaps all its children itself. When the control socket closes it stops accepting
and exits once its last child is gone; if the supervisor dies it gets ``SIGKILL``
(``PR_SET_PDEATHSIG``), and so, in a chain, does every sandbox.
"""

from __future__ import annotations

import array
import contextlib
import gc
import marshal
import os
import resource
import select
import signal
import socket
import sys
from typing import NamedTuple, NoReturn

from privsep.sandbox import _child
from privsep.sandbox import _libc as libc
from privsep.sandbox._enter import root_layout
from privsep.sandbox._wire import Plan, write_exit_record

DEFAULT_PRELOAD = (
    "privsep.client",
    # The runner's entry points (privsep's own code): importing them in every sandbox cost
    # about 1.5 ms of CPU per task.
    "privsep.client._parse",
    "privsep.client._task",
    "privsep.client._trigger",
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
    # One status pipe per live sandbox stays open here: allow as many as the hard limit does.
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
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
    child = _serve(ctl, _Forker.create())
    gc.enable()
    _child.run(child.plan, child.status_fd, child.request_fd, child.lifeline)


class _Child(NamedTuple):
    """What a freshly forked child takes from the zygote into ``_child.run``."""

    plan: Plan
    status_fd: int
    request_fd: int  # -1: not pre-warmed
    lifeline: int  # -1: not forked into a PID namespace (a monitor will be)


class _Forker:
    """Forks children, into a new PID namespace each when the zygote may create one (root)."""

    def __init__(self, own_pid_ns: int, lifeline_r: int, lifeline_w: int) -> None:
        self.own_pid_ns = own_pid_ns
        self.lifeline_r = lifeline_r
        self.lifeline_w = lifeline_w

    @classmethod
    def create(cls) -> _Forker:
        """As root: an fd on our own PID namespace and the lifeline pipe. Otherwise inert."""
        if os.geteuid() != 0:
            return cls(-1, -1, -1)
        own = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
        lifeline_r, lifeline_w = os.pipe2(os.O_CLOEXEC)
        return cls(own, lifeline_r, lifeline_w)

    def fork(self, plan: Plan) -> tuple[int, bool]:
        """``os.fork()``, and whether the child is PID 1 of a new PID namespace.

        If this zygote cannot create the namespace (no CAP_SYS_ADMIN, a nesting limit), the
        child is forked as before and its own ``unshare`` reports the failure as a setup step.
        """
        direct = self.own_pid_ns >= 0 and not plan.userns and not plan.unsafe_inline
        if direct:
            try:
                libc.unshare(libc.CLONE_NEWPID)
            except OSError:
                direct = False
        try:
            pid = os.fork()
        except BaseException:
            if direct:
                libc.setns(self.own_pid_ns, libc.CLONE_NEWPID)
            raise
        if pid == 0:
            for fd in (self.own_pid_ns, self.lifeline_w):
                if fd >= 0:
                    os.close(fd)
            if not direct and self.lifeline_r >= 0:
                os.close(self.lifeline_r)
            return 0, direct
        if direct:
            # Our next child must not land in this one's namespace; failing here is fatal.
            try:
                libc.setns(self.own_pid_ns, libc.CLONE_NEWPID)
            except OSError:
                os._exit(71)
        return pid, direct


def _serve(ctl: socket.socket, forker: _Forker) -> _Child:
    """Fork per request. Returns only in a child."""
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    children: dict[int, int] = {}  # pid -> status fd we report its exit on, or -1
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
        if not plan.unsafe_inline:
            with contextlib.suppress(OSError):  # the child reports it, as a setup step
                root_layout(plan)  # resolved here once, inherited by every child
        pid, direct = forker.fork(plan)
        out_w, status_w = fds[:2]
        if pid == 0:
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            ctl.close()
            os.close(wake_r)
            os.close(wake_w)
            os.dup2(out_w, 1)
            os.dup2(out_w, 2)
            os.close(out_w)
            lifeline = forker.lifeline_r if direct else -1
            return _Child(plan, status_w, fds[2] if len(fds) == 3 else -1, lifeline)
        # In a PID namespace of its own the child has no monitor: we report its exit.
        keep = status_w if direct else -1
        children[pid] = keep
        for fd in fds:
            if fd != keep:
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


def _reap(children: dict[int, int]) -> None:
    """Reap every exited child; for those without a monitor, write their ``X`` record."""
    while True:
        try:
            pid, status, usage = os.wait4(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        status_fd = children.pop(pid, -1)
        if status_fd >= 0:
            with contextlib.suppress(OSError):  # EPIPE: the supervisor gave up on it
                write_exit_record(status_fd, status, usage)
            os.close(status_fd)


if __name__ == "__main__":
    main(sys.argv)
