"""sd_notify against a real AF_UNIX datagram socket standing in for systemd's $NOTIFY_SOCKET.

The watchdog tests run the real pinging thread with short intervals; the decision logic is also
driven directly with a scripted clock, without sleeping.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from privsep.runner.supervisor.systemd import (
    LoopWatchdog,
    Notifier,
    scrub_environ,
    watchdog_interval,
)


class FakeSystemd:
    """The receiving end of ``$NOTIFY_SOCKET``: a bound datagram socket and its messages."""

    def __init__(self, address: str) -> None:
        self.address = address  # as it would appear in NOTIFY_SOCKET
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        bind = "\0" + address[1:] if address.startswith("@") else address
        self.sock.bind(bind)

    def recv(self, timeout: float = 2.0) -> dict[str, str]:
        self.sock.settimeout(timeout)
        data = self.sock.recv(4096).decode()
        assert data.endswith("\n"), data
        return dict(line.split("=", 1) for line in data.splitlines())

    def drain(self) -> list[dict[str, str]]:
        out = []
        while True:
            try:
                out.append(self.recv(timeout=0.001))
            except TimeoutError:
                return out

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def short_dir() -> Iterator[Path]:
    # sun_path holds 108 bytes: pytest's tmp_path can be longer than that.
    with tempfile.TemporaryDirectory(prefix="sdn", dir="/tmp") as d:
        yield Path(d)


@pytest.fixture(params=["path", "abstract"])
def systemd(request: pytest.FixtureRequest, short_dir: Path) -> Iterator[FakeSystemd]:
    if request.param == "path":
        address = str(short_dir / "notify")
    else:
        address = f"@privsep-test-{secrets.token_hex(8)}"
    fake = FakeSystemd(address)
    yield fake
    fake.close()


def notifier_for(fake: FakeSystemd) -> Notifier:
    n = Notifier.from_environ({"NOTIFY_SOCKET": fake.address})
    assert n is not None
    return n


# --- Notifier -----------------------------------------------------------------------------


def test_ready_stopping_status_arrive(systemd: FakeSystemd) -> None:
    n = notifier_for(systemd)
    assert n.ready()
    assert systemd.recv() == {"READY": "1"}
    assert n.ready(status="serving 4 slots")
    assert systemd.recv() == {"READY": "1", "STATUS": "serving 4 slots"}
    assert n.status("draining: 2 attempts left")
    assert systemd.recv() == {"STATUS": "draining: 2 attempts left"}
    assert n.stopping()
    assert systemd.recv() == {"STOPPING": "1"}
    assert n.watchdog()
    assert systemd.recv() == {"WATCHDOG": "1"}
    n.close()


def test_send_puts_all_fields_in_one_datagram(systemd: FakeSystemd) -> None:
    n = notifier_for(systemd)
    n.send(STATUS="x", MAINPID=os.getpid(), ERRNO=5)
    assert systemd.recv() == {"STATUS": "x", "MAINPID": str(os.getpid()), "ERRNO": "5"}
    assert systemd.drain() == []


def test_a_newline_in_a_value_cannot_add_a_field(systemd: FakeSystemd) -> None:
    n = notifier_for(systemd)
    n.status("failed: boom\nREADY=1\nWATCHDOG=1")
    assert systemd.recv() == {"STATUS": "failed: boom READY=1 WATCHDOG=1"}


def test_bad_field_name_is_a_programming_error(systemd: FakeSystemd) -> None:
    with pytest.raises(ValueError, match="not an sd_notify field name"):
        notifier_for(systemd).send(**{"READY=1\nX": 1})


def test_socket_is_close_on_exec(systemd: FakeSystemd) -> None:
    n = notifier_for(systemd)
    assert not os.get_inheritable(n._sock.fileno())


def test_no_notify_socket_means_no_notifier() -> None:
    assert Notifier.from_environ({}) is None
    assert Notifier.from_environ({"NOTIFY_SOCKET": ""}) is None


@pytest.mark.parametrize("value", ["relative/path", "vsock:2:1234", "@"])
def test_unusable_address_is_ignored_with_a_warning(
    value: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, "privsep.systemd"):
        assert Notifier.from_environ({"NOTIFY_SOCKET": value}) is None
    assert f"ignoring NOTIFY_SOCKET={value!r}" in caplog.text


def test_dead_socket_path_does_not_raise_and_warns_once(
    short_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    n = Notifier.from_environ({"NOTIFY_SOCKET": str(short_dir / "gone")})
    assert n is not None
    with caplog.at_level(logging.DEBUG, "privsep.systemd"):
        assert n.ready() is False
        assert n.watchdog() is False
        assert n.stopping() is False
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "cannot notify the service manager" in warnings[0].getMessage()
    assert "No such file or directory" in warnings[0].getMessage()
    assert sum(r.levelno == logging.DEBUG for r in caplog.records) == 2


def test_socket_that_stopped_listening_does_not_raise(short_dir: Path) -> None:
    fake = FakeSystemd(str(short_dir / "notify"))
    n = notifier_for(fake)
    fake.close()  # the file stays, nobody listens: ECONNREFUSED
    assert n.ready() is False


def test_full_receiver_queue_times_out_instead_of_blocking(short_dir: Path) -> None:
    fake = FakeSystemd(str(short_dir / "notify"))
    n = Notifier(fake.address, timeout=0.05)
    for _ in range(100_000):  # nobody reads: the queue fills
        started = time.monotonic()
        if not n.status("x" * 100):
            break
    else:
        pytest.fail("the receiver's queue never filled")
    assert time.monotonic() - started < 2
    fake.close()


# --- environment ----------------------------------------------------------------------------


def test_scrub_environ_removes_exactly_the_notify_variables() -> None:
    env = {
        "NOTIFY_SOCKET": "/run/systemd/notify",
        "WATCHDOG_USEC": "30000000",
        "WATCHDOG_PID": "1",
        "PATH": "/usr/bin",
    }
    assert scrub_environ(env) == {
        "NOTIFY_SOCKET": "/run/systemd/notify",
        "WATCHDOG_USEC": "30000000",
        "WATCHDOG_PID": "1",
    }
    assert env == {"PATH": "/usr/bin"}
    assert scrub_environ(env) == {}


def test_children_do_not_inherit_scrubbed_os_environ(
    systemd: FakeSystemd, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", systemd.address)
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")
    n = Notifier.from_environ()
    assert n is not None
    scrub_environ(os.environ)
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import os; print(sorted(k for k in os.environ if "
            "k.startswith(('NOTIFY', 'WATCHDOG'))))",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.strip() == "[]"
    assert n.ready()  # the notifier still works after the scrub
    assert systemd.recv() == {"READY": "1"}


def test_watchdog_interval_from_usec() -> None:
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 30.0
    assert watchdog_interval({"WATCHDOG_USEC": "250000", "WATCHDOG_PID": str(os.getpid())}) == 0.25
    assert watchdog_interval({"WATCHDOG_USEC": "1000", "WATCHDOG_PID": "77"}, pid=77) == 0.001


def test_watchdog_pid_mismatch_means_no_watchdog() -> None:
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}) is None
    assert (
        watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)})
        is None
    )


@pytest.mark.parametrize(
    "env",
    [
        {},
        {"WATCHDOG_USEC": ""},
        {"WATCHDOG_USEC": "0"},
        {"WATCHDOG_USEC": "-5"},
        {"WATCHDOG_USEC": "thirty"},
        {"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "me"},
    ],
)
def test_no_or_bad_watchdog_settings_mean_no_watchdog(env: dict[str, str]) -> None:
    assert watchdog_interval(env) is None


# --- LoopWatchdog: decisions under a scripted clock --------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_watchdog_pings_only_for_a_recent_tick(systemd: FakeSystemd) -> None:
    clock = Clock()
    dog = LoopWatchdog(notifier_for(systemd), 10.0, clock=clock)
    assert dog.period == 5.0 and dog.max_tick_age == 5.0
    assert dog.check() is False  # the loop never turned
    dog.tick()
    clock.now += 4.9
    assert dog.check() is True
    assert systemd.recv() == {"WATCHDOG": "1"}
    clock.now += 0.2  # 5.1 s since the tick: the loop is stuck
    assert dog.check() is False
    dog.tick()
    assert dog.check() is True
    assert systemd.recv() == {"WATCHDOG": "1"}
    assert systemd.drain() == []


def test_watchdog_logs_a_stall_once_and_the_recovery(
    systemd: FakeSystemd, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock()
    dog = LoopWatchdog(notifier_for(systemd), 2.0, clock=clock)
    dog.tick()
    clock.now += 3
    with caplog.at_level(logging.WARNING, "privsep.systemd"):
        for _ in range(5):
            assert dog.check() is False
        dog.tick()
        assert dog.check() is True
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2, messages
    assert messages[0].startswith("work loop has not turned for 3 s: withholding watchdog pings")
    assert messages[1] == "work loop is turning again: resuming watchdog pings"


def test_watchdog_rejects_a_nonpositive_interval(systemd: FakeSystemd) -> None:
    with pytest.raises(ValueError, match="must be positive"):
        LoopWatchdog(notifier_for(systemd), 0)


# --- LoopWatchdog: the real thread ----------------------------------------------------------


def test_pings_arrive_while_the_loop_turns_and_stop_when_it_blocks(
    systemd: FakeSystemd,
) -> None:
    interval = 0.6  # pings every 0.3 s, withheld once the last tick is 0.3 s old
    dog = LoopWatchdog(notifier_for(systemd), interval)
    blocked = threading.Event()
    done = threading.Event()

    def work_loop() -> None:
        while not done.is_set():
            dog.tick()
            if blocked.is_set():
                done.wait()  # a call that never returns: the loop is hung
            time.sleep(0.01)

    loop = threading.Thread(target=work_loop, daemon=True)
    dog.start()
    loop.start()
    try:
        # Turning: a ping at start, then one every 0.3 s (allow one lost to a loaded CI box).
        time.sleep(1.0)
        turning = systemd.drain()
        assert len(turning) >= 3, turning
        assert all(m == {"WATCHDOG": "1"} for m in turning)

        blocked.set()
        time.sleep(interval)  # the last tick ages past 0.3 s; at most one late ping
        systemd.drain()
        time.sleep(2 * interval)  # systemd would have killed us by now
        assert systemd.drain() == []
    finally:
        done.set()
        dog.stop()
        loop.join()


def test_stop_ends_the_pings(systemd: FakeSystemd) -> None:
    # A 1 s period: the thread gets a whole second to start on a loaded box, and the second
    # ping comes well after the first, so the immediate one is the one received.
    dog = LoopWatchdog(notifier_for(systemd), 2.0)
    dog.start()
    assert systemd.recv(timeout=1) == {"WATCHDOG": "1"}
    dog.stop()
    systemd.drain()
    dog.tick()
    time.sleep(1.5)  # the thread would have pinged again by now
    assert systemd.drain() == []
    with pytest.raises(RuntimeError, match="already started"):
        dog.start()
        dog.start()
    dog.stop()
