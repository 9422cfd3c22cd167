"""systemd integration without libsystemd: ``sd_notify`` and a watchdog tied to the work loop.

The supervisor runs in the foreground under ``Type=notify``. systemd passes two things in the
environment: ``NOTIFY_SOCKET`` (where to send state changes: ``READY=1``, ``STOPPING=1``,
``STATUS=...``, ``WATCHDOG=1``) and, with ``WatchdogSec=``, ``WATCHDOG_USEC``/``WATCHDOG_PID``.
The protocol is one ``AF_UNIX`` datagram of ``KEY=value`` lines, so a dependency on libsystemd
buys nothing.

Two properties matter more than the protocol:

- **Children never inherit the notify socket.** A sandbox that could write ``READY=1`` or
  ``WATCHDOG=1`` on our behalf could hide a hung supervisor. The socket we open is close-on-exec,
  and :func:`scrub_environ` removes the variables once they are read (the sandbox builds its
  environment from an allowlist anyway; this is the second lock).
- **A watchdog ping means the loop turned.** A timer thread that pings unconditionally proves
  only that the interpreter is alive. :class:`LoopWatchdog` pings only while the supervisor's
  loop keeps calling :meth:`LoopWatchdog.tick`, so a loop stuck in a blocking call lets systemd
  kill and restart us.

Typical use, early in ``runner supervisor``::

    notifier = Notifier.from_environ()
    interval = watchdog_interval()
    scrub_environ(os.environ)
    dog = LoopWatchdog(notifier, interval) if notifier and interval else None
    ...
    notifier.ready(status="serving") ; dog.start()
    while running: dog.tick(); ...
    notifier.stopping(); dog.stop()
"""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Mapping, MutableMapping

log = logging.getLogger("privsep.systemd")

#: The variables systemd sets for ``Type=notify`` and ``WatchdogSec=``. None of them is meant
#: for the processes we start.
NOTIFY_VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")

_KEY = re.compile(r"[A-Z][A-Z0-9_]*\Z")


def _address(value: str) -> bytes | None:
    """Turn ``$NOTIFY_SOCKET`` into a ``sendto`` address, or ``None`` for a form we can't use.

    An absolute path is a socket file; a leading ``@`` names an abstract socket, written on the
    wire with a leading NUL byte instead. systemd also knows ``vsock:`` addresses (for virtual
    machines), which a supervisor on the host never receives.
    """
    if value.startswith("@") and len(value) > 1:
        return b"\0" + os.fsencode(value[1:])
    if value.startswith("/"):
        return os.fsencode(value)
    return None


class Notifier:
    """Sends ``sd_notify`` datagrams to one address.

    Sending never raises: a lost status update must not take down the supervisor, and the
    service manager going away is not our problem to solve. The first failure is logged at
    warning (so a misconfigured unit is visible), later ones at debug (so a dead socket doesn't
    flood the log once a second).
    """

    def __init__(self, address: str | bytes, *, timeout: float = 1.0) -> None:
        """``address``: a socket path, ``@name`` for an abstract socket, or raw bytes.

        ``timeout`` bounds a send when the receiver's queue is full: a stalled systemd must not
        stall the work loop, which also calls :meth:`status`.
        """
        if isinstance(address, str):
            parsed = _address(address)
            if parsed is None:
                raise ValueError(
                    f"unsupported notify socket address {address!r}: "
                    "expected an absolute path or an @abstract name"
                )
            address = parsed
        self.address = address
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._sock.settimeout(timeout)
        self._lock = threading.Lock()
        self._warned = False

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] = os.environ) -> Notifier | None:
        """A notifier for ``$NOTIFY_SOCKET``, or ``None`` when not started by systemd.

        An address we cannot use is logged and treated as absent rather than refusing to start:
        the service still works, systemd will just report a start timeout that names the cause.
        """
        value = environ.get("NOTIFY_SOCKET", "")
        if not value:
            return None
        if _address(value) is None:
            log.warning(
                "ignoring NOTIFY_SOCKET=%r: expected an absolute path or an @abstract name", value
            )
            return None
        return cls(value)

    def __repr__(self) -> str:
        shown = "@" + os.fsdecode(self.address[1:]) if self.address[:1] == b"\0" else self.address
        return f"Notifier({os.fsdecode(shown)!r})"

    def send(self, **fields: str | int) -> bool:
        """Send ``KEY=value`` lines in one datagram; ``True`` if the kernel accepted it.

        Newlines inside a value are turned into spaces: a status text taken from an error
        message must not be able to add a ``READY=1`` or ``WATCHDOG=1`` line of its own.
        """
        lines = []
        for key, value in fields.items():
            if not _KEY.match(key):
                raise ValueError(f"not an sd_notify field name: {key!r}")
            text = str(value).replace("\r", " ").replace("\n", " ")
            lines.append(f"{key}={text}\n")
        payload = "".join(lines).encode("utf-8", "replace")
        try:
            self._sock.sendto(payload, self.address)
        except OSError as exc:
            with self._lock:
                first, self._warned = not self._warned, True
            where = repr(self)
            if first:
                log.warning(
                    "cannot notify the service manager at %s: %s (further failures are logged "
                    "at debug)",
                    where,
                    exc.strerror or exc,
                )
            else:
                log.debug("cannot notify the service manager at %s: %s", where, exc)
            return False
        return True

    def ready(self, status: str = "") -> bool:
        """``READY=1``: start-up is complete and the supervisor is serving."""
        if status:
            return self.send(READY=1, STATUS=status)
        return self.send(READY=1)

    def stopping(self) -> bool:
        """``STOPPING=1``: shutdown has begun (draining counts as stopping)."""
        return self.send(STOPPING=1)

    def status(self, text: str) -> bool:
        """``STATUS=``: one line shown by ``systemctl status``."""
        return self.send(STATUS=text)

    def watchdog(self) -> bool:
        """``WATCHDOG=1``: prefer :class:`LoopWatchdog`, which only pings for a live loop."""
        return self.send(WATCHDOG=1)

    def close(self) -> None:
        self._sock.close()


def watchdog_interval(
    environ: Mapping[str, str] = os.environ, *, pid: int | None = None
) -> float | None:
    """The watchdog interval in seconds from ``$WATCHDOG_USEC``, or ``None`` if not enabled.

    ``WATCHDOG_PID``, when set, names the process the watchdog is meant for (``sd_watchdog_enabled``
    honours it the same way): a process that inherited the variables from its parent must not
    start pinging for it. ``pid`` defaults to ours.
    """
    raw_usec = environ.get("WATCHDOG_USEC", "")
    if not raw_usec:
        return None
    raw_pid = environ.get("WATCHDOG_PID", "")
    if raw_pid:
        try:
            wanted = int(raw_pid)
        except ValueError:
            log.warning("ignoring the watchdog: WATCHDOG_PID=%r is not a pid", raw_pid)
            return None
        if wanted != (os.getpid() if pid is None else pid):
            log.debug("watchdog is for pid %d, not us; not pinging", wanted)
            return None
    try:
        usec = int(raw_usec)
    except ValueError:
        usec = 0
    if usec <= 0:
        log.warning("ignoring the watchdog: WATCHDOG_USEC=%r is not a positive integer", raw_usec)
        return None
    return usec / 1_000_000


def scrub_environ(environ: MutableMapping[str, str]) -> dict[str, str]:
    """Remove the notify and watchdog variables; returns what was removed.

    Call it once :meth:`Notifier.from_environ` and :func:`watchdog_interval` have read them, so
    no child process (sandbox, helper command) can inherit them. On ``os.environ`` the deletion
    also unsets the process environment that ``fork``/``exec`` pass on.
    """
    return {name: environ.pop(name) for name in NOTIFY_VARIABLES if name in environ}


class LoopWatchdog:
    """Pings ``WATCHDOG=1`` from a thread, but only while the work loop keeps turning.

    The supervisor's loop calls :meth:`tick` on every pass. Every ``interval / 2`` the thread
    sends a ping if the last tick is younger than ``max_tick_age`` (``interval / 2`` by
    default). A loop blocked in a call stops ticking; the pings stop within about
    ``interval / 2``; systemd sees no ping for ``interval`` and kills and restarts the service.
    So the loop must turn at least every ``max_tick_age`` (the supervisor's one-second drain
    timeout is far below any sensible ``WatchdogSec=``).

    ``clock`` must be monotonic; tests inject a fake one and drive :meth:`check` directly.
    """

    def __init__(
        self,
        notifier: Notifier,
        interval: float,
        *,
        max_tick_age: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if interval <= 0:
            raise ValueError(f"watchdog interval must be positive, not {interval!r}")
        self.notifier = notifier
        self.interval = interval
        self.period = interval / 2
        self.max_tick_age = interval / 2 if max_tick_age is None else max_tick_age
        self._clock = clock
        self._last_tick: float | None = None
        self._stalled = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def tick(self) -> None:
        """The loop turned. Cheap enough for every pass: one clock read, one store."""
        self._last_tick = self._clock()

    def check(self) -> bool:
        """One decision of the pinging thread: ping if the loop ticked recently.

        Returns whether a ping was sent. A stall is logged once (not on every missed ping), and
        the recovery too, so the log shows when the loop hung and for how long.
        """
        last = self._last_tick
        age = None if last is None else self._clock() - last
        if age is None or age >= self.max_tick_age:
            if not self._stalled:
                self._stalled = True
                log.warning(
                    "work loop has not turned for %s: withholding watchdog pings "
                    "(systemd restarts the service after %.3g s without one)",
                    "ever" if age is None else f"{age:.3g} s",
                    self.interval,
                )
            return False
        if self._stalled:
            self._stalled = False
            log.warning("work loop is turning again: resuming watchdog pings")
        return self.notifier.watchdog()

    def start(self) -> None:
        """Start pinging. Counts as a tick: the loop is about to start turning."""
        if self._thread is not None:
            raise RuntimeError("LoopWatchdog already started")
        self.tick()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="sd-watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop pinging and wait for the thread (at most one ``check``)."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join()

    def _run(self) -> None:
        # Ping at once, then every period: the first ping should not wait half an interval.
        while True:
            try:
                self.check()
            except Exception:  # never let the thread die silently: that is a restart loop
                log.exception("watchdog check failed")
            if self._stop.wait(self.period):
                return
