"""The sandboxed child's main program, shared by both launch modes.

Spawn mode execs ``python -I -m privsep.sandbox._child PLAN_FD STATUS_FD``: a fresh interpreter
with an empty environment that reads its :class:`~privsep.sandbox._wire.Plan` from ``PLAN_FD``.
Template mode reaches :func:`run` in a fork of the zygote. Either way the process holds no copy
of the supervisor's memory.

:func:`run` calls ``enter()``; what returns from it is the sandboxed user process, which loads
the entry point (a function inside privsep that then loads user code), reports "ready" on the
status pipe, closes it, and calls ``entry(argv, payload)``. The function's return value is the
exit code. The process then ends through ``_exit.call_and_exit``: threads joined, ``atexit``
handlers run and files flushed as in a normal exit, but without tearing the interpreter down
(which would copy every page shared with the zygote only to free it).
"""

from __future__ import annotations

import os
import resource
import signal
import sys
from typing import NoReturn

from privsep.sandbox import _libc as libc
from privsep.sandbox._enter import (
    describe_error,
    enter,
    enter_unsafe_inline,
    lifeline_cut,
)
from privsep.sandbox._exit import call_and_exit
from privsep.sandbox._steps import SetupStep, fail, load_entry_point
from privsep.sandbox._wire import READY, Plan, write_record


def run(plan: Plan, status_fd: int, request_fd: int = -1, lifeline: int = -1) -> NoReturn:
    """Bootstrap checks, ``enter()``, then the entry point. Never returns.

    ``lifeline`` >= 0: the zygote forked us as PID 1 of a new PID namespace and will report
    our exit; the fd reads EOF once the zygote is gone (our ``getppid()`` is 0 here).
    """
    try:
        # Die with whoever launched us (the supervisor's launcher thread, or the zygote), and
        # catch the race where it already died before the prctl.
        libc.set_pdeathsig(signal.SIGKILL)
        if lifeline >= 0:
            if lifeline_cut(lifeline):
                raise OSError(0, "the zygote is gone")
        elif os.getppid() != plan.parent_pid:
            raise OSError(0, f"parent {plan.parent_pid} is gone (now {os.getppid()})")
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        os.umask(0o022)
        libc.set_dumpable(False)
        if request_fd >= 0 and not plan.userns and may_return_to_nice_zero():
            # Pre-warming must not compete with sandboxes being launched right now; the user
            # process returns to nice 0 when its request arrives (a monitor stays at 10).
            os.nice(10)
    except OSError as exc:
        fail(status_fd, SetupStep.BOOTSTRAP, describe_error(exc))

    if plan.unsafe_inline:
        enter_unsafe_inline(plan, status_fd)
    else:
        plan = enter(plan, status_fd, request_fd, lifeline)

    # From here on this is the sandboxed user process.
    signal.signal(signal.SIGTERM, _terminate)
    entry = load_entry_point(plan.entry, status_fd)
    try:
        write_record(status_fd, READY)
    finally:
        os.close(status_fd)
    sys.argv = [plan.entry, *plan.argv]
    call_and_exit(lambda: entry(list(plan.argv), plan.payload))


CAP_SYS_NICE = 23


def may_return_to_nice_zero() -> bool:
    """Whether a process at nice 10 could get back to nice 0: RLIMIT_NICE allows nice values
    down to ``20 - limit``, and CAP_SYS_NICE allows any. Where neither holds (a container
    whose hard RLIMIT_NICE is 0, which systemd cannot raise there), a pre-warmed sandbox
    stays at nice 0 rather than fail its launch."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NICE)
    if soft == resource.RLIM_INFINITY or soft >= 20:
        return True
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> CAP_SYS_NICE & 1)
    return False


def _terminate(signum: int, _frame: object) -> None:
    """PID 1 ignores SIGTERM without a handler; turn it into a clean interpreter exit."""
    raise SystemExit(128 + signum)


def main(argv: list[str]) -> NoReturn:
    """Spawn mode: ``python -I -m privsep.sandbox._child PLAN_FD STATUS_FD``."""
    try:
        plan_fd, status_fd = int(argv[1]), int(argv[2])
    except (IndexError, ValueError):
        os.write(2, b"privsep: usage: python -I -m privsep.sandbox._child PLAN_FD STATUS_FD\n")
        os._exit(int(SetupStep.BOOTSTRAP))
    try:
        chunks = []
        while chunk := os.read(plan_fd, 65536):
            chunks.append(chunk)
        os.close(plan_fd)
        plan = Plan.from_wire(b"".join(chunks))
    except (OSError, ValueError) as exc:
        fail(status_fd, SetupStep.BOOTSTRAP, f"cannot read the launch plan: {describe_error(exc)}")
    run(plan, status_fd)


if __name__ == "__main__":
    main(sys.argv)
