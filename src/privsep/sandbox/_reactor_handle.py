"""What the process and container handles share.

Both backends watch their sandboxes from one reactor thread, which owns each handle's state:
the public methods here only read that state or post work to the thread. The watching itself is
the same for both: output read from one fd into the log capture, status records from another,
the wall-clock deadline, ``_terminate`` and ``_signal`` (through a pidfd, so never a reused pid),
the outcome read by one classifier (``_classify``) and the completion. A backend's handle adds
only what differs: how its output is framed, how it learns of the end and gathers the facts of
it, how it kills everything, and what it gives back once the sandbox is gone.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from abc import abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Self

from privsep.sandbox._classify import ExitFacts, classify
from privsep.sandbox._hostprep import release_workdir
from privsep.sandbox._logcap import LogCapture
from privsep.sandbox._reactor import Reactor, Timer
from privsep.sandbox._wire import FAILED, READY, RecordParser
from privsep.sandbox.handle import SandboxHandle
from privsep.sandbox.spec import SandboxSpec
from privsep.sandbox.status import ExitReason, ExitStatus, SandboxOutput

log = logging.getLogger("privsep.sandbox")

READ_CHUNK = 65536
READS_PER_EVENT = 16  # then other sandboxes get their turn on the reactor
DRAIN_AFTER_EXIT = 2.0  # how long output may still arrive once the sandbox has ended


@dataclass(frozen=True)
class Launched:
    """One sandbox a backend started: its spec, the pool uid it runs as (``None`` when it
    holds none), and the host's ends the reactor watches and writes to.

    ``pid`` is ``None`` and ``pidfd`` -1 when the sandbox had already ended when looked at.
    The handle owns every fd from here on.
    """

    spec: SandboxSpec
    uid: int | None
    pid: int | None
    pidfd: int
    out_fd: int
    status_fd: int
    log_fd: int
    log_path: str


class ReactorHandle(SandboxHandle):
    """A sandbox watched by a backend's reactor thread (see the module docstring).

    The work dir of a sandbox that holds a pool uid is handed back to root when the sandbox
    is gone. ``finished(handle, release_uid)`` then tells the backend it is gone, and whether
    its uid may go to another sandbox.
    """

    _finished: Callable[[Self, bool], None]

    def __init__(
        self, *, launched: Launched, reactor: Reactor, finished: Callable[[Self, bool], None]
    ) -> None:
        self._reactor = reactor
        self._finished = finished
        self.spec = spec = launched.spec
        self.uid = launched.uid
        self._pid = launched.pid
        self._pidfd = launched.pidfd
        self._out_fd = launched.out_fd
        self._status_fd = launched.status_fd
        self._log_fd = launched.log_fd
        self._log_path = launched.log_path
        lim = spec.limits
        self._capture = LogCapture(
            launched.log_fd,
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

    def _attach(self) -> None:
        """Start watching: output, status records, the end, and the wall-clock deadline."""
        for fd in (self._out_fd, self._status_fd):
            os.set_blocking(fd, False)
        self._reactor.add_reader(self._out_fd, self._on_output)
        self._reactor.add_reader(self._status_fd, self._on_status)
        if self._pidfd >= 0:
            self._reactor.add_reader(self._pidfd, self._on_exit)
        else:
            self._on_exit(-1)  # it had already ended when the backend looked
        wall = self.spec.limits.wall_seconds
        self._timers.append(
            self._reactor.call_later(wall, lambda: self._terminate(ExitReason.TIMEOUT, None))
        )

    def _on_output(self, fd: int) -> None:
        for _ in range(READS_PER_EVENT):
            try:
                data = os.read(fd, READ_CHUNK)
            except BlockingIOError:
                return
            except OSError:  # the stream broke: what came so far is all there is
                data = b""
            if not data:
                self._close_output()
                return
            self._feed_output(data)

    def _feed_output(self, data: bytes) -> None:
        """Bytes read from the output fd; a backend whose stream is framed unframes them."""
        self._capture.feed(data)

    def _flush_output(self) -> None:
        """The output stream ended: a backend keeps what it still holds back (a cut frame)."""

    def _stop_reading(self, fd: int) -> None:
        self._reactor.remove_reader(fd)
        os.close(fd)

    def _close_output(self) -> None:
        if self._out_open:
            self._out_open = False
            self._stop_reading(self._out_fd)
            self._flush_output()
            self._capture.finish()
            self._maybe_finish()

    def _on_status(self, fd: int) -> None:
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return
        if not data:
            self._close_status()
            return
        for kind, payload in self._parser.feed(data):
            self._on_record(kind, payload)

    def _close_status(self) -> None:
        if self._status_open:
            self._status_open = False
            self._stop_reading(self._status_fd)
            self._maybe_finish()

    @abstractmethod
    def _on_exit(self, fd: int) -> None:
        """The pidfd became readable (or ``fd`` is -1: it had already ended)."""

    def _cancel_timers(self) -> None:
        for timer in self._timers:
            timer.cancel()
        self._timers = []

    @abstractmethod
    def _end_known(self) -> bool:
        """Whether the backend has everything it will learn of the end (output aside)."""

    @abstractmethod
    def _facts(self) -> ExitFacts:
        """What this backend saw of the end, for :func:`classify`."""

    @abstractmethod
    def _give_back(self) -> bool:
        """Free what the sandbox held (cgroups, container); False if something of it may
        still run, so its uid must not go to another sandbox."""

    def _maybe_finish(self: Self) -> None:
        if self._done.is_set() or not self._end_known() or self._out_open or self._status_open:
            return
        self._cancel_timers()
        self._status = classify(self._facts(), self.spec.limits)
        with contextlib.suppress(OSError):
            os.close(self._log_fd)
        clean = self._give_back()
        if self.uid is not None:
            release_workdir(self.spec.workdir)
        self._finished(self, clean)
        self._complete()

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
