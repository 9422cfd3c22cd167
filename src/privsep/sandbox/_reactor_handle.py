"""What the process and container handles share.

Both backends watch their sandboxes from one reactor thread, which owns each handle's state:
the public methods here only read that state or post work to the thread. A backend's handle
adds how its sandbox's output, status records and end reach the reactor, and how its outcome
is read; ``_terminate`` and ``_signal`` (through a pidfd, so never a reused pid) and the
completion (``_complete``) are the same for both.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from abc import abstractmethod
from collections.abc import Callable

from privsep.sandbox._logcap import LogCapture
from privsep.sandbox._reactor import Reactor, Timer
from privsep.sandbox._wire import FAILED, READY, RecordParser
from privsep.sandbox.handle import SandboxHandle
from privsep.sandbox.spec import SandboxSpec
from privsep.sandbox.status import ExitReason, ExitStatus, SandboxOutput

log = logging.getLogger("privsep.sandbox")


class ReactorHandle(SandboxHandle):
    """A sandbox watched by a backend's reactor thread (see the module docstring)."""

    def __init__(
        self,
        *,
        reactor: Reactor,
        spec: SandboxSpec,
        pid: int | None,
        pidfd: int,
        log_fd: int,
        log_path: str,
    ) -> None:
        self._reactor = reactor
        self.spec = spec
        self._pid = pid
        self._pidfd = pidfd
        self._log_fd = log_fd
        self._log_path = log_path
        lim = spec.limits
        self._capture = LogCapture(
            log_fd,
            max_bytes=lim.log_max_bytes,
            max_lines=lim.log_max_lines,
            max_line_bytes=lim.log_max_line_bytes,
        )
        self._parser = RecordParser()
        self._ready = False
        self._failure: tuple[int, str] | None = None
        self._exited = False
        self._out_open = True
        self._status_open = True
        self._termination: ExitReason | None = None
        self._timers: list[Timer] = []
        self._status: ExitStatus | None = None
        self._running = threading.Event()
        self._done = threading.Event()
        self._done_callbacks: list[Callable[[], object]] = []
        self._callbacks_lock = threading.Lock()

    # -- public API (any thread) ------------------------------------------------------------

    @property
    def sandbox_id(self) -> str:
        return self.spec.sandbox_id

    @property
    def pid(self) -> int | None:
        return self._pid

    @property
    def status(self) -> ExitStatus | None:
        return self._status

    def wait(self, timeout: float | None = None) -> ExitStatus | None:
        self._done.wait(timeout)
        return self._status

    def wait_running(self, timeout: float | None = None) -> bool:
        self._running.wait(timeout)
        return self._ready

    def add_done_callback(self, fn: Callable[[], object]) -> None:
        """Called from the reactor thread the moment the status is final (no waiting thread:
        the supervisor watches every running sandbox this way)."""
        with self._callbacks_lock:
            if not self._done.is_set():
                self._done_callbacks.append(fn)
                return
        fn()

    def kill(self, grace: float | None = None) -> None:
        if self._done.is_set():
            return
        g = self.spec.limits.kill_grace_seconds if grace is None else grace
        # RuntimeError: the reactor stopped, so the backend is closed and everything is dead.
        with contextlib.suppress(RuntimeError):
            self._reactor.call_soon(lambda: self._terminate(ExitReason.KILLED, g))

    def output(self) -> SandboxOutput:
        with open(self._log_path, "rb") as fh:
            data = fh.read()
        return SandboxOutput(
            path=self._log_path,
            data=data,
            bytes_received=self._capture.received,
            truncated=self._capture.truncated,
        )

    # -- reactor thread ----------------------------------------------------------------------

    def _on_record(self, kind: bytes, payload: object) -> None:
        """One status record from the sandbox's setup code: running, or failed."""
        if kind == READY and not self._ready and self._failure is None:
            self._ready = True
            self._running.set()
        elif kind == FAILED and self._failure is None and isinstance(payload, tuple):
            self._failure = (int(payload[0]), str(payload[1]))

    def _terminate(self, reason: ExitReason, grace: float | None) -> None:
        if self._exited or self._done.is_set():
            return
        if self._termination is None:
            self._termination = reason
        g = self.spec.limits.kill_grace_seconds if grace is None else grace
        if g <= 0:
            self._hard_kill()
            return
        self._signal(signal.SIGTERM)
        self._timers.append(self._reactor.call_later(g, self._hard_kill))

    @abstractmethod
    def _hard_kill(self) -> None:
        """SIGKILL everything of the sandbox."""

    def _signal(self, signum: int) -> None:
        if self._pidfd < 0:
            return
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(self._pidfd, signum)

    def _complete(self) -> None:
        """The status is final: wake the waiters, then run the done-callbacks."""
        self._running.set()
        self._done.set()
        with self._callbacks_lock:  # after the set: a callback added from now on runs at once
            callbacks, self._done_callbacks = self._done_callbacks, []
        for fn in callbacks:
            try:
                fn()
            except Exception:
                log.exception("privsep: a done-callback of sandbox %s failed", self.sandbox_id)
