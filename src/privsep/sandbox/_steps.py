"""Named exit codes for each sandbox setup step, shared by the child and the supervisor.

gunicorn's workers exit ``WORKER_BOOT_ERROR`` or ``APP_LOAD_ERROR`` so the arbiter can say what
went wrong; a sandbox that fails to drop privileges must likewise be reported as "privilege
drop failed", not "exit 1". The codes start at 70 and are only trusted when the supervisor did
not see the "user code started" record (see ``_wire``), so user code exiting 78 on purpose is
never mistaken for a setup failure.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable
from enum import IntEnum
from typing import NoReturn

from privsep.sandbox._wire import FAILED, write_record

EntryPoint = Callable[[list[str], bytes], "int | None"]


class SetupStep(IntEnum):
    """One step of ``enter()``; the value is the exit code used when it fails."""

    BOOTSTRAP = 70
    SETSID = 71
    CGROUP = 72
    CLOSE_FDS = 73
    ENVIRONMENT = 74
    NAMESPACES = 75
    PID_NAMESPACE = 76
    FILESYSTEM = 77
    RLIMITS = 78
    DROP_PRIVILEGES = 79
    VERIFY_DROP = 80
    NO_NEW_PRIVS = 81
    PDEATHSIG = 82
    SECCOMP = 83
    ENTRY_POINT = 84
    REQUEST = 85

    @property
    def message(self) -> str:
        """The text the supervisor logs for a failure of this step."""
        return _MESSAGES[self]


_MESSAGES: dict[SetupStep, str] = {
    SetupStep.BOOTSTRAP: "sandbox bootstrap failed (bad launch request)",
    SetupStep.SETSID: "new session (setsid) failed",
    SetupStep.CGROUP: "joining the sandbox cgroup failed",
    SetupStep.CLOSE_FDS: "closing inherited file descriptors failed",
    SetupStep.ENVIRONMENT: "environment reset failed",
    SetupStep.NAMESPACES: "namespace creation (unshare) failed",
    SetupStep.PID_NAMESPACE: "fork into the new PID namespace failed",
    SetupStep.FILESYSTEM: "building the sandbox filesystem view failed",
    SetupStep.RLIMITS: "setting resource limits failed",
    SetupStep.DROP_PRIVILEGES: "privilege drop failed",
    SetupStep.VERIFY_DROP: "privilege drop verification failed (could regain root)",
    SetupStep.NO_NEW_PRIVS: "PR_SET_NO_NEW_PRIVS failed",
    SetupStep.PDEATHSIG: "PR_SET_PDEATHSIG failed (or the parent already died)",
    SetupStep.SECCOMP: "seccomp install failed",
    SetupStep.ENTRY_POINT: "entry point could not be loaded",
    SetupStep.REQUEST: "pre-warmed sandbox got no valid launch request",
}

SETUP_CODES = frozenset(int(s) for s in SetupStep)


def fail(status_fd: int, step: SetupStep, detail: str) -> NoReturn:
    """Report a failed step on the status channel (when there is one yet) and in the log,
    then exit with its code. The record's detail is cut to fit a status record, whose
    parser would otherwise drop it and lose the reason."""
    if status_fd >= 0:
        with contextlib.suppress(OSError):
            write_record(status_fd, FAILED, (int(step), detail[:4000]))
    with contextlib.suppress(OSError):
        os.write(2, f"privsep: {step.message}: {detail}\n".encode(errors="replace"))
    os._exit(int(step))


def load_entry_point(entry: str, status_fd: int) -> EntryPoint:
    """The trusted ``privsep.module:function`` a sandbox runs, which then loads user code.
    Anything outside the ``privsep`` package is refused: the launch request names it."""
    module_name, _, func_name = entry.partition(":")
    if not (module_name == "privsep" or module_name.startswith("privsep.")) or not func_name:
        fail(status_fd, SetupStep.ENTRY_POINT, f"{entry!r} is not a privsep entry point")
    try:
        __import__(module_name)
        func = getattr(sys.modules[module_name], func_name)
    except Exception as exc:  # any import-time error of the entry module is a setup failure
        fail(status_fd, SetupStep.ENTRY_POINT, f"cannot load {entry}: {exc!r}")
    if not callable(func):
        fail(status_fd, SetupStep.ENTRY_POINT, f"{entry} is not callable")
    return func  # type: ignore[no-any-return]
