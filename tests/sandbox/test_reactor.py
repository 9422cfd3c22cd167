"""The reactor's own contract, now that the credential sockets share it with the sandboxes:
a watched fd moves between reading and writing, many calls handed in at once all run, and a
call handed in before the stop still runs."""

from __future__ import annotations

import selectors
import socket
import threading

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
