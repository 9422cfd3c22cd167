"""The backend-neutral handle on one running sandbox.

Both the process backend and a later container backend hand one of these back from
``launch(spec)``. Callers wait, kill, read the outcome and read the output; nothing here says
how the isolation is done.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable

from privsep.sandbox.status import ExitStatus, SandboxOutput


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
