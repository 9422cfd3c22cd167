"""End the supervisor loop's wait the moment there is something to do.

The loop used to sleep a fixed 20 ms between passes, so every event (a sandbox ending, a
task's report making its downstream runnable, a signal) waited for the next tick, and an idle
supervisor still woke 50 times a second. Now the loop waits on one socket until its next
timer is due, and whatever has news writes a byte to it: another thread through
:meth:`LoopWaker.wake`, a signal through :func:`signal.set_wakeup_fd` (the Python handler still
only enqueues; the C-level wakeup byte is what ends the wait), and a sandbox's end through
:meth:`LoopWaker.watch`, which asks the handle to call :meth:`LoopWaker.wake` when it ends
(the process backend does so from the thread that sees the end: no thread waits per sandbox).
"""

from __future__ import annotations

import contextlib
import queue
import select
import signal
import socket
import time
from typing import Any

__all__ = ["LoopWaker", "StopOnTerm"]


class LoopWaker:
    """One self-pipe (a socket pair) the loop waits on. Thread-safe; :meth:`wait` is the
    loop's alone."""

    def __init__(self) -> None:
        self._r, self._w = socket.socketpair()
        self._r.setblocking(False)
        self._w.setblocking(False)
        self._pending = False  # a byte is on its way: more wakes add nothing
        self._signals = False

    def wake(self) -> None:
        """End the loop's current (or next) wait. Cheap when a wake is already pending."""
        if self._pending:
            return
        self._pending = True
        with contextlib.suppress(OSError):  # full (a wake is pending anyway) or closed
            self._w.send(b"\0")

    def wake_on_signals(self) -> None:
        """Make every signal end the wait too. Main thread only (a rule of ``signal``)."""
        signal.set_wakeup_fd(self._w.fileno(), warn_on_full_buffer=False)
        self._signals = True

    def watch(self, handle: Any) -> None:
        """Wake the loop when ``handle`` (a sandbox handle) has ended. A wake after
        :meth:`close` does nothing."""
        handle.add_done_callback(self.wake)

    def wait(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for a wake, then take every pending one."""
        if timeout > 0:
            with contextlib.suppress(InterruptedError):
                select.select([self._r], [], [], timeout)
        with contextlib.suppress(BlockingIOError, OSError):
            while self._r.recv(4096):
                pass
        # After draining: the bytes just drained may include a later wake's, and a flag left
        # set with an empty socket would silence every wake after it. A wake that found the
        # flag still set is seen by the pass that follows this wait.
        self._pending = False

    def close(self) -> None:
        """Release the sockets (and the signal wake-up fd)."""
        if self._signals:
            with contextlib.suppress(ValueError):  # not the main thread
                signal.set_wakeup_fd(-1)
        self._r.close()
        self._w.close()


class StopOnTerm:
    """A wait ended by SIGTERM or SIGINT: the supervisor's start-up wait for the server, and
    ``runner token-refresher``'s waits between renewals.

    The signal handler only enqueues (and wakes the waker's pipe), so start-up reads the same
    queue the loop will: a stop ends the wait at once, and any other signal is left queued for
    the loop. Without this a supervisor that cannot reach its server would wait out
    ``TimeoutStopSec`` and be killed.
    """

    def __init__(self, waker: LoopWaker, signals: queue.SimpleQueue[int]) -> None:
        self._waker = waker
        self._signals = signals
        self._stopped = False

    def is_set(self) -> bool:
        later = []
        while True:
            try:
                sig = self._signals.get_nowait()
            except queue.Empty:
                break
            if sig in (signal.SIGTERM, signal.SIGINT):
                self._stopped = True
            else:
                later.append(sig)
        for sig in later:
            self._signals.put_nowait(sig)
        return self._stopped

    def wait(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not self.is_set() and (left := deadline - time.monotonic()) > 0:
            self._waker.wait(left)
        return self._stopped
