"""The supervisor loop's waker: another thread, a signal and a sandbox's end each end its wait.

The waits below are long (60 s): each test passes as soon as the wake arrives and would only
hang, not flake, if it never did. No timing is asserted.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from privsep.runner.supervisor.loopwake import LoopWaker
from privsep.sandbox.handle import SandboxHandle

LONG = 60.0


@pytest.fixture
def waker() -> Iterator[LoopWaker]:
    w = LoopWaker()
    try:
        yield w
    finally:
        w.close()


def test_a_wake_from_another_thread_ends_the_wait(waker: LoopWaker) -> None:
    done = threading.Event()

    def loop() -> None:
        waker.wait(LONG)
        done.set()

    t = threading.Thread(target=loop)
    t.start()
    waker.wake()
    waker.wake()  # a second wake while one is pending adds nothing
    t.join(LONG)
    assert done.is_set()


def test_a_wake_before_the_wait_is_not_lost_and_is_taken_once(waker: LoopWaker) -> None:
    waker.wake()
    waker.wait(LONG)  # returns at once: the byte was already there
    waker.wake()  # pending was cleared by the wait, so this sends a new byte
    waker.wait(LONG)


def test_a_signal_ends_the_wait_and_the_handler_still_runs(waker: LoopWaker) -> None:
    got: list[int] = []
    old = signal.signal(signal.SIGUSR1, lambda signum, frame: got.append(signum))
    try:
        waker.wake_on_signals()
        timer = threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGUSR1))
        timer.start()
        waker.wait(LONG)
        timer.join()
    finally:
        signal.signal(signal.SIGUSR1, old)
    assert got == [signal.SIGUSR1]


class _Handle(SandboxHandle):
    """A sandbox handle whose end the test decides; the ``SandboxHandle`` base's own
    ``add_done_callback`` (a thread that waits) is what the waker relies on here. The process
    backend's own callback is tested with real sandboxes in tests/sandbox."""

    def __init__(self) -> None:
        self._ended = threading.Event()

    def end(self) -> None:
        self._ended.set()

    def wait(self, timeout: float | None = None) -> Any:
        return "ended" if self._ended.wait(timeout) else None

    sandbox_id = "test"
    pid = None
    status = None

    def wait_running(self, timeout: float | None = None) -> bool:
        return True

    def kill(self, grace: float | None = None) -> None:
        self.end()

    def output(self) -> Any:
        return None


def test_a_watched_sandbox_that_ends_wakes_the_loop(waker: LoopWaker) -> None:
    handle = _Handle()
    waker.watch(handle)
    threading.Timer(0.05, handle.end).start()
    waker.wait(LONG)
    assert handle.wait(0) == "ended"
