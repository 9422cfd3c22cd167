"""The supervisor's heartbeat file and ``runner health``'s verdict on it.

Each pass of the work loop rewrites one small JSON record in the state directory. A separate
process (``runner health``, a container liveness probe, a monitoring agent) judges the
supervisor by that record alone, without talking to it: a supervisor whose loop is stuck could
still answer on a socket from another thread, but it cannot keep the heartbeat fresh.

The record holds wall-clock time because the reader is another process, possibly started after
a reboot; a clock step is handled as a (reported) anomaly rather than trusted blindly.
"""

from __future__ import annotations

import errno
import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from privsep.secrets.files import rename_over, temporary_copy

#: The heartbeat's file name inside the state directory.
HEARTBEAT_FILE = "supervisor-heartbeat.json"

#: How far in the future a heartbeat may be before we call it a clock problem, not "fresh".
_FUTURE_SLACK = 2.0


def heartbeat_path(state_dir: str | os.PathLike[str]) -> Path:
    return Path(state_dir) / HEARTBEAT_FILE


def _pid_namespace() -> str | None:
    """Our pid namespace (``pid:[4026531836]``), or ``None`` where /proc doesn't tell.

    A pid is only meaningful in the namespace that issued it: a health probe run through
    ``docker exec`` in another namespace must not declare the supervisor dead because the
    number means nothing there.
    """
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def write_heartbeat(
    state_dir: str | os.PathLike[str],
    *,
    pid: int,
    detail: Mapping[str, Any],
    now: float | None = None,
) -> Path:
    """Replace the heartbeat record atomically; returns its path.

    A temporary file in the same directory (mode 0600: the detail may name attempts and paths
    that other users have no business seeing) is renamed over the old record, so a reader sees
    either the previous record or the new one, never a torn write. There is no ``fsync``: the
    record is rewritten every second, and after a power cut a stale or missing heartbeat is the
    truth anyway. ``detail`` must be JSON-serialisable; an ``OSError`` (disk full, state
    directory removed) is the caller's to log; the loop should carry on.
    """
    path = heartbeat_path(state_dir)
    record = {
        "time": time.time() if now is None else now,
        "pid": pid,
        "pid_ns": _pid_namespace(),
        "detail": dict(detail),
    }
    data = json.dumps(record, sort_keys=True).encode() + b"\n"
    rename_over(temporary_copy(str(path), data), str(path))
    return path


@dataclass(frozen=True)
class HealthResult:
    """The verdict: ``ok`` decides the exit status, ``reason`` is the line a person reads.

    ``age`` (seconds since the last heartbeat) and ``pid`` are set when the record could be
    read, for callers that report numbers rather than text (the server's health endpoint).
    """

    ok: bool
    reason: str
    age: float | None = None
    pid: int | None = None


def _secs(value: float, limit: float) -> str:
    """Whole seconds for people; one decimal when the limit itself is under a second."""
    return f"{value:.1f}" if limit < 1 else f"{value:.0f}"


def _pid_running(pid: int) -> bool:
    """Whether ``pid`` names a live process (a zombie is dead: it will never heartbeat)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return True  # no /proc: kill(0) is all we know
    # The state letter follows the command name, which is in parentheses and may hold spaces.
    state = stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3]
    return state not in (b"Z", b"X")


def check_health(
    state_dir: str | os.PathLike[str], max_age: float, now: float | None = None
) -> HealthResult:
    """Judge the supervisor by its heartbeat record: present, readable, its pid alive, recent.

    The checks run from most to least specific, so the reason names the actual cause: a
    ``kill -9`` reads "pid N is not running" rather than just "stale".
    """
    path = heartbeat_path(state_dir)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return HealthResult(False, f"no heartbeat file {path} (is the supervisor running?)")
    except OSError as exc:
        hint = " (run as the supervisor's user or root)" if exc.errno == errno.EACCES else ""
        return HealthResult(
            False, f"cannot read heartbeat file {path}: {exc.strerror or exc}{hint}"
        )
    try:
        record = json.loads(raw)
        beat = float(record["time"])
        pid = int(record["pid"])
        pid_ns = record.get("pid_ns")
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        return HealthResult(False, f"heartbeat file {path} is not a heartbeat record: {exc}")

    age = (time.time() if now is None else now) - beat
    same_ns = pid_ns is None or pid_ns == _pid_namespace()
    if same_ns and not _pid_running(pid):
        return HealthResult(
            False,
            f"pid {pid} is not running: the supervisor died "
            f"(last heartbeat {_secs(max(age, 0), max_age)} s ago)",
            age,
            pid,
        )
    if age < -_FUTURE_SLACK:
        return HealthResult(
            False,
            f"last heartbeat is {_secs(-age, max_age)} s in the future: the system clock was "
            "set back (the next heartbeat fixes this if the supervisor is alive)",
            age,
            pid,
        )
    if age > max_age:
        return HealthResult(
            False,
            f"last heartbeat {_secs(age, max_age)} s ago (limit {_secs(max_age, max_age)} s): "
            "the work loop is stuck or the supervisor died",
            age,
            pid,
        )
    return HealthResult(
        True, f"ok: heartbeat {_secs(max(age, 0), max_age)} s ago, pid {pid}", age, pid
    )
