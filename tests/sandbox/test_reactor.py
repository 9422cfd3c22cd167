"""The reactor's own contract, now that the credential sockets share it with the sandboxes:
a watched fd moves between reading and writing, many calls handed in at once all run, and a
call handed in before the stop still runs."""

from __future__ import annotations

import gc
import selectors
import socket
import threading
import weakref

import pytest

from privsep.sandbox._reactor import Reactor


def test_watch_switches_a_socket_between_reading_and_writing() -> None:
    reactor = Reactor(name="test-reactor")
    a, b = socket.socketpair()
    a.setblocking(False)
    seen: list[str] = []
    done = threading.Event()

    def on_ready(fd: int) -> None:
        if not seen:
            seen.append(a.recv(16).decode())
            reactor.watch(fd, selectors.EVENT_WRITE, on_ready)  # now wait to write the reply
        else:
            a.send(b"pong")
            seen.append("wrote")
            reactor.watch(fd, 0, on_ready)  # and stop watching
            done.set()

    try:
        reactor.call_soon(lambda: reactor.watch(a.fileno(), selectors.EVENT_READ, on_ready))
        b.sendall(b"ping")
        assert done.wait(5)
        assert seen == ["ping", "wrote"]
        assert b.recv(16) == b"pong"
    finally:
        reactor.stop()
        a.close()
        b.close()


def test_every_call_runs_though_wake_ups_are_coalesced() -> None:
    reactor = Reactor(name="test-reactor")
    ran: list[int] = []
    done = threading.Event()
    try:
        for i in range(500):
            reactor.call_soon(lambda i=i: ran.append(i))
        reactor.call_soon(done.set)
        assert done.wait(5)
        assert ran == list(range(500))
    finally:
        reactor.stop()


def test_calls_handed_in_before_the_stop_run_and_later_ones_are_refused() -> None:
    reactor = Reactor(name="test-reactor")
    ran = threading.Event()
    assert reactor.running
    reactor.call_soon(ran.set)
    reactor.stop()
    assert ran.is_set()
    assert not reactor.running
    with pytest.raises(RuntimeError, match="stopped"):
        reactor.call_soon(lambda: None)


class _Sandbox:
    """Stands for a sandbox's handle, which a deadline timer's callback holds."""


def test_cancelled_timers_let_go_of_what_they_hold_and_leave_the_heap() -> None:
    """A supervisor cancels a sandbox's deadline when the sandbox ends, long before the
    deadline would come. The timer must not keep the handle alive until then, nor may the
    reactor keep every cancelled timer: a supervisor ending thousands of sandboxes an hour
    grew by megabytes a minute when it did."""
    reactor = Reactor(name="test-reactor-timers")
    try:
        done = threading.Event()
        refs: list[weakref.ref[_Sandbox]] = []

        def schedule_and_cancel() -> None:
            for _ in range(5000):
                held = _Sandbox()
                refs.append(weakref.ref(held))
                timer = reactor.call_later(3600, lambda held=held: None)  # type: ignore[misc]
                del held
                timer.cancel()
            done.set()

        reactor.call_soon(schedule_and_cancel)
        assert done.wait(30)
        gc.collect()
        assert [r for r in refs if r() is not None] == []
        assert len(reactor._timers) < 200  # compacted, not 5000 cancelled entries
    finally:
        reactor.stop()
