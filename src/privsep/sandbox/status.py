"""How a sandbox ended, in words a person can act on, and what it printed.

The supervisor should log "seccomp install failed" or "killed: wall-clock timeout after 30 s",
not "exit 83" or "signal 9". :class:`ExitStatus` carries the raw facts (exit code or signal)
and a named :class:`ExitReason` with a one-line ``detail``.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass
from enum import Enum

from privsep.sandbox._steps import SetupStep


class ExitReason(Enum):
    """Why a sandbox is no longer running."""

    SUCCEEDED = "succeeded"
    """The entry point returned 0."""
    FAILED = "failed"
    """User code exited with a non-zero code (an uncaught exception is 1)."""
    SIGNALED = "signaled"
    """User code died from a signal nobody in the supervisor sent (crash, SIGSYS, ...)."""
    TIMEOUT = "timeout"
    """The wall-clock limit passed; the supervisor terminated the sandbox."""
    KILLED = "killed"
    """:meth:`SandboxHandle.kill` was called."""
    CPU_LIMIT = "cpu-limit"
    """The CPU-seconds rlimit was reached."""
    MEMORY_LIMIT = "memory-limit"
    """The sandbox's memory cgroup ran out and the kernel OOM-killed inside it."""
    SETUP_FAILED = "setup-failed"
    """A step before user code failed (see ``setup_step``); user code never ran."""
    LOST = "lost"
    """Whoever reaps the sandbox (its monitor, or the zygote) died without reporting its exit."""


@dataclass(frozen=True)
class ExitStatus:
    """The outcome of one sandbox.

    ``exit_code`` is set when user code exited normally, ``signal`` when it was killed; at most
    one of them is set. ``setup_step`` is set for ``SETUP_FAILED``. ``cpu_seconds`` is the user
    process tree's CPU time when known.
    """

    reason: ExitReason
    detail: str
    exit_code: int | None = None
    signal: int | None = None
    setup_step: SetupStep | None = None
    cpu_seconds: float | None = None
    max_rss_kib: int | None = None

    @property
    def ok(self) -> bool:
        """True only for a clean exit 0 of user code."""
        return self.reason is ExitReason.SUCCEEDED

    def __str__(self) -> str:
        return f"{self.reason.value}: {self.detail}"


def signal_name(signum: int) -> str:
    """``SIGKILL`` for 9; ``signal 77`` for numbers without a name."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


@dataclass(frozen=True)
class SandboxOutput:
    """The captured stdout+stderr of one sandbox.

    ``data`` is what the log file holds: control characters escaped, at most the byte and line
    caps; ``bytes_received`` counts everything the child wrote, kept or not; ``truncated`` is
    set when any of it was dropped (an overlong line or a cap).
    """

    path: str
    data: bytes
    bytes_received: int
    truncated: bool

    @property
    def text(self) -> str:
        """The log as text (it is valid UTF-8 with escapes for anything else)."""
        return self.data.decode("utf-8", "replace")
