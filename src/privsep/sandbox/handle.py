"""The backend-neutral handle on one running sandbox, and the backend-neutral backend.

Both the process backend and the container backend hand one of these back from
``launch(spec)``. Callers wait, kill, read the outcome and read the output; nothing here says
how the isolation is done. :class:`SandboxBackend` is what a caller (the supervisor) may
rely on of either backend, so it can hold one without knowing which, and still be checked.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

from privsep.sandbox.status import ExitStatus, SandboxOutput

if TYPE_CHECKING:
    from privsep.sandbox.spec import SandboxSpec
    from privsep.sandbox.uidpool import UidPool


class SandboxHandle(ABC):
    """One launched sandbox. Thread-safe: wait/kill/output may be called from any thread."""

    @property
    @abstractmethod
    def sandbox_id(self) -> str:
        """The spec's ``sandbox_id``."""

    @property
    @abstractmethod
    def pid(self) -> int | None:
        """Host pid of the outermost process of the sandbox (for logs; never signal it)."""

    @abstractmethod
    def wait(self, timeout: float | None = None) -> ExitStatus | None:
        """Block until the sandbox has ended and its output is drained; ``None`` on timeout."""

    def add_done_callback(self, fn: Callable[[], object]) -> None:
        """Call ``fn()`` once, from any thread, when the sandbox has ended (at once if it has).

        ``fn`` must be quick and must not raise. This default waits in a thread of its own;
        a backend that learns of the end itself calls ``fn`` from there instead.
        """

        def wait_then_call() -> None:
            self.wait()
            fn()

        threading.Thread(target=wait_then_call, name="privsep-sandbox-done", daemon=True).start()

    @abstractmethod
    def wait_running(self, timeout: float | None = None) -> bool:
        """Block until user code has started (or the sandbox ended); True if it started."""

    @abstractmethod
    def kill(self, grace: float | None = None) -> None:
        """Terminate: SIGTERM now, SIGKILL for everything in the sandbox after ``grace`` s.

        ``grace`` defaults to the spec's ``kill_grace_seconds``; 0 kills at once. Idempotent.
        """

    @property
    @abstractmethod
    def status(self) -> ExitStatus | None:
        """The outcome once finished, else ``None`` (never blocks)."""

    @abstractmethod
    def output(self) -> SandboxOutput:
        """What has been captured so far (complete once :meth:`wait` returned a status)."""


class SandboxBackend(Protocol):
    """What every backend offers: launch sandboxes, list the running ones, close them all."""

    @property
    def uid_pool(self) -> UidPool:
        """The pool sandboxes draw their uids from."""
        ...

    def describe(self) -> str:
        """One line for the supervisor's startup log: how children are isolated here."""
        ...

    def launch(self, spec: SandboxSpec) -> SandboxHandle:
        """Start one sandbox for ``spec``; ``SandboxLaunchError`` if none could start."""
        ...

    def running(self) -> Sequence[SandboxHandle]:
        """Handles of sandboxes not yet finished."""
        ...

    def close(self, grace: float = 1.0) -> None:
        """Kill every running sandbox, wait for them, and stop what the backend runs."""
        ...
