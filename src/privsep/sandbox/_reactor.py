"""One thread that watches every sandbox's pipes, pidfds and deadlines.

A thread per sandbox would not scale to thousands of children, and a blocking read on a child's
pipe would let a child stall the supervisor. The reactor runs an epoll selector over non-blocking
fds: output pipes, status pipes and pidfds (readable when the process exits); plus a heap of
timers for wall-clock deadlines and kill escalation. Other threads never touch that state: they
hand work in with :meth:`Reactor.call_soon`, which wakes the loop through a pipe.

The supervisor's credential sockets run on the same reactor (:meth:`Reactor.watch` covers their
writes too): one selector loop, one place where a slow callback would show, instead of two
loops with two sets of wake-up and timer code.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import os
import selectors
import threading
import time
from collections import deque
from collections.abc import Callable

log = logging.getLogger("privsep.sandbox")

FdCallback = Callable[[int], None]


# The smallest heap worth compacting (see Reactor.call_later).
_MIN_COMPACT = 64


class Timer:
    """A cancellable scheduled call (cancel only from the reactor thread)."""

    __slots__ = ("callback", "cancelled", "when")

    def __init__(self, when: float, callback: Callable[[], None]) -> None:
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        """Do not run it (idempotent). The callback is let go at once: it usually holds a
        sandbox's handle, and a cancelled deadline can sit in the heap for as long as the
        sandbox's time limit (hours) before its turn comes."""
        self.cancelled = True
        self.callback = _nothing


def _nothing() -> None:
    """What a cancelled timer would call."""


class Reactor:
    """The event loop thread. Start once; stop at backend shutdown."""

    def __init__(self, name: str = "privsep-sandbox-reactor") -> None:
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._selector.register(self._wake_r, selectors.EVENT_READ, self._drain_wake)
        self._calls: deque[Callable[[], None]] = deque()
        self._timers: list[tuple[float, int, Timer]] = []
        # Cancelled timers stay in the heap until their turn; it is rebuilt without them when
        # it reaches this size, which then doubles: amortized O(1) per timer, and the heap of a
        # supervisor that ends thousands of sandboxes before their deadlines stays small.
        self._compact_at = _MIN_COMPACT
        self._seq = itertools.count()
        self._stopping = False
        self._closed = False
        self._wake_pending = False  # a wake-up byte is in the pipe: more calls add nothing
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def in_reactor_thread(self) -> bool:
        """Whether the caller is the reactor thread itself."""
        return threading.current_thread() is self._thread

    @property
    def running(self) -> bool:
        """Whether calls handed in now will still run (not stopping, not stopped)."""
        return self._thread.is_alive() and not self._stopping

    def call_soon(self, func: Callable[[], None]) -> None:
        """Run ``func`` on the reactor thread (thread-safe); RuntimeError once stopped."""
        with self._lock:
            if self._closed:
                raise RuntimeError("the sandbox reactor has stopped")
            self._calls.append(func)
            # One byte per turn is enough: a sandbox's start and end hand in several calls in
            # a row, and each write is a syscall the loop would then have to drain.
            if self._wake_pending:
                return
            self._wake_pending = True
            with contextlib.suppress(BlockingIOError):  # full of wake-ups already
                os.write(self._wake_w, b"x")

    def call_later(self, delay: float, func: Callable[[], None]) -> Timer:
        """Schedule ``func`` after ``delay`` seconds (reactor thread only)."""
        timer = Timer(time.monotonic() + max(delay, 0.0), func)
        heapq.heappush(self._timers, (timer.when, next(self._seq), timer))
        if len(self._timers) >= self._compact_at:
            self._timers = [entry for entry in self._timers if not entry[2].cancelled]
            heapq.heapify(self._timers)
            self._compact_at = max(_MIN_COMPACT, 2 * len(self._timers))
        return timer

    def add_reader(self, fd: int, callback: FdCallback) -> None:
        """Call ``callback(fd)`` whenever ``fd`` is readable (reactor thread only)."""
        self._selector.register(fd, selectors.EVENT_READ, callback)

    def remove_reader(self, fd: int) -> None:
        """Stop watching ``fd`` (reactor thread only; safe if not registered)."""
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(fd)

    def watch(self, fd: int, events: int, callback: FdCallback) -> None:
        """Call ``callback(fd)`` when ``fd`` is ready for ``events`` (``EVENT_READ``,
        ``EVENT_WRITE`` or both), replacing what was watched before; ``0`` stops watching.
        For a connection that alternates between reading a request and writing its reply
        (reactor thread only)."""
        if events == 0:
            self.remove_reader(fd)
            return
        try:
            self._selector.modify(fd, events, callback)
        except KeyError:
            self._selector.register(fd, events, callback)

    def stop(self, timeout: float = 5.0) -> None:
        """Finish the loop after the calls already queued; joins the thread."""

        def _stop() -> None:
            self._stopping = True

        self.call_soon(_stop)
        if not self.in_reactor_thread:
            self._thread.join(timeout)

    def _drain_wake(self, fd: int) -> None:
        try:
            while os.read(fd, 4096):
                pass
        except BlockingIOError:
            pass
        # Cleared after draining (a byte drained here may be a later call's, which must then
        # not be left "pending" with nothing in the pipe) and before this turn runs the calls:
        # a call handed in from here on writes a new byte, earlier ones run in this turn.
        with self._lock:
            self._wake_pending = False

    def _run(self) -> None:
        while not self._stopping:
            timeout = None
            if self._calls:
                timeout = 0.0
            elif self._timers:
                timeout = max(self._timers[0][0] - time.monotonic(), 0.0)
            for key, _ in self._selector.select(timeout):
                self._guard(key.data, key.fd)
            now = time.monotonic()
            while self._timers and self._timers[0][0] <= now:
                _, _, timer = heapq.heappop(self._timers)
                if not timer.cancelled:
                    self._guard(timer.callback)
            while self._calls:
                self._guard(self._calls.popleft())
        with self._lock:
            self._closed = True
        # Calls handed in after the last turn still run: a caller whose call_soon succeeded
        # may be waiting for it (the credential server's close does).
        while self._calls:
            self._guard(self._calls.popleft())
        with self._lock:
            self._selector.close()
            os.close(self._wake_r)
            os.close(self._wake_w)

    @staticmethod
    def _guard(func: Callable[..., None], *args: int) -> None:
        try:
            func(*args)
        except Exception:  # a bug in one sandbox's handling must not stop the others
            log.exception("privsep: sandbox reactor callback failed")
