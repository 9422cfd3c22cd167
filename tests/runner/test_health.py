"""Heartbeat records and ``check_health`` verdicts, with real files and real (dead) pids."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from privsep.runner.supervisor.health import (
    HEARTBEAT_FILE,
    HealthResult,
    check_health,
    heartbeat_path,
    write_heartbeat,
)


@pytest.fixture
def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture
def zombie_pid() -> Iterator[int]:
    """A child that has exited but is not reaped yet: dead, though ``kill(pid, 0)`` works."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    for _ in range(500):
        with open(f"/proc/{proc.pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                break
        time.sleep(0.01)
    else:
        pytest.fail("child never became a zombie")
    yield proc.pid
    proc.wait()


def test_record_is_json_with_time_pid_detail_and_mode_0600(tmp_path: Path) -> None:
    before = time.time()
    path = write_heartbeat(tmp_path, pid=os.getpid(), detail={"running": 3, "draining": False})
    assert path == tmp_path / HEARTBEAT_FILE == heartbeat_path(tmp_path)
    record = json.loads(path.read_text())
    assert before <= record["time"] <= time.time()
    assert record["pid"] == os.getpid()
    assert record["detail"] == {"running": 3, "draining": False}
    assert record["pid_ns"] == os.readlink("/proc/self/ns/pid")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert os.listdir(tmp_path) == [HEARTBEAT_FILE]  # no temporary file left behind


def test_rewrite_replaces_the_file_atomically(tmp_path: Path) -> None:
    """A reader racing the writer always sees a whole record: never empty, never torn."""
    write_heartbeat(tmp_path, pid=1, detail={"n": 0})
    stop = threading.Event()
    seen: list[int] = []
    errors: list[Exception] = []

    def reader() -> None:
        while not stop.is_set():
            try:
                seen.append(json.loads(heartbeat_path(tmp_path).read_bytes())["detail"]["n"])
            except Exception as exc:
                errors.append(exc)

    t = threading.Thread(target=reader)
    t.start()
    for n in range(1, 500):
        write_heartbeat(tmp_path, pid=1, detail={"n": n, "pad": "x" * 5000})
    stop.set()
    t.join()
    assert errors == []
    assert seen == sorted(seen) and seen
    assert os.listdir(tmp_path) == [HEARTBEAT_FILE]


def test_unserialisable_detail_leaves_the_old_record_and_no_temp_file(tmp_path: Path) -> None:
    write_heartbeat(tmp_path, pid=1, detail={"n": 1})
    with pytest.raises(TypeError):
        write_heartbeat(tmp_path, pid=1, detail={"n": object()})
    assert json.loads(heartbeat_path(tmp_path).read_text())["detail"] == {"n": 1}
    assert os.listdir(tmp_path) == [HEARTBEAT_FILE]


def test_missing_state_dir_raises_for_the_caller_to_log(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        write_heartbeat(tmp_path / "gone", pid=1, detail={})


def test_ok(tmp_path: Path) -> None:
    write_heartbeat(tmp_path, pid=os.getpid(), detail={}, now=1000.0)
    result = check_health(tmp_path, max_age=30, now=1002.25)
    assert result == HealthResult(
        True, f"ok: heartbeat 2 s ago, pid {os.getpid()}", 2.25, os.getpid()
    )


def test_ok_with_the_real_clock(tmp_path: Path) -> None:
    write_heartbeat(tmp_path, pid=os.getpid(), detail={})
    result = check_health(tmp_path, max_age=30)
    assert result.ok
    assert result.reason == f"ok: heartbeat 0 s ago, pid {os.getpid()}"


def test_no_heartbeat_file(tmp_path: Path) -> None:
    result = check_health(tmp_path, max_age=30)
    assert result == HealthResult(
        False, f"no heartbeat file {tmp_path / HEARTBEAT_FILE} (is the supervisor running?)"
    )


def test_stale_heartbeat(tmp_path: Path) -> None:
    write_heartbeat(tmp_path, pid=os.getpid(), detail={}, now=1000.0)
    result = check_health(tmp_path, max_age=30, now=1093.4)
    assert not result.ok
    assert result.reason == (
        "last heartbeat 93 s ago (limit 30 s): the work loop is stuck or the supervisor died"
    )
    assert result.age == pytest.approx(93.4)


def test_sub_second_limits_are_not_shown_as_zero(tmp_path: Path) -> None:
    write_heartbeat(tmp_path, pid=os.getpid(), detail={}, now=1000.0)
    result = check_health(tmp_path, max_age=0.5, now=1000.75)
    assert result.reason.startswith("last heartbeat 0.8 s ago (limit 0.5 s)")


def test_dead_pid(tmp_path: Path, dead_pid: int) -> None:
    write_heartbeat(tmp_path, pid=dead_pid, detail={}, now=1000.0)
    result = check_health(tmp_path, max_age=30, now=1005.0)
    assert result == HealthResult(
        False,
        f"pid {dead_pid} is not running: the supervisor died (last heartbeat 5 s ago)",
        5.0,
        dead_pid,
    )


def test_dead_pid_is_reported_before_staleness(tmp_path: Path, dead_pid: int) -> None:
    write_heartbeat(tmp_path, pid=dead_pid, detail={}, now=1000.0)
    result = check_health(tmp_path, max_age=30, now=1100.0)
    assert result.reason.startswith(f"pid {dead_pid} is not running")


def test_zombie_counts_as_dead(tmp_path: Path, zombie_pid: int) -> None:
    write_heartbeat(tmp_path, pid=zombie_pid, detail={}, now=1000.0)
    result = check_health(tmp_path, max_age=30, now=1001.0)
    assert result.reason.startswith(f"pid {zombie_pid} is not running")


def test_pid_from_another_pid_namespace_is_not_checked(tmp_path: Path, dead_pid: int) -> None:
    """A probe in another pid namespace can't judge the number; it goes by the age alone."""
    write_heartbeat(tmp_path, pid=dead_pid, detail={}, now=1000.0)
    path = heartbeat_path(tmp_path)
    record = json.loads(path.read_text())
    record["pid_ns"] = "pid:[1]"
    path.write_text(json.dumps(record))
    assert check_health(tmp_path, max_age=30, now=1001.0).ok


def test_heartbeat_from_the_future(tmp_path: Path) -> None:
    write_heartbeat(tmp_path, pid=os.getpid(), detail={}, now=1100.0)
    assert check_health(tmp_path, max_age=30, now=1099.0).ok  # within the slack
    result = check_health(tmp_path, max_age=30, now=1000.0)
    assert not result.ok
    assert result.reason.startswith(
        "last heartbeat is 100 s in the future: the system clock was set back"
    )


@pytest.mark.parametrize("content", [b"", b"{not json", b"[]", b'{"time": "x", "pid": 1}', b"{}"])
def test_garbage_record(tmp_path: Path, content: bytes) -> None:
    (tmp_path / HEARTBEAT_FILE).write_bytes(content)
    result = check_health(tmp_path, max_age=30)
    assert not result.ok
    assert result.reason.startswith(
        f"heartbeat file {tmp_path / HEARTBEAT_FILE} is not a heartbeat record: "
    )


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to read as another uid")
def test_unreadable_record_names_the_fix(tmp_path: Path) -> None:
    write_heartbeat(tmp_path, pid=os.getpid(), detail={})
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            os.setuid(65534)
            result = check_health(tmp_path, max_age=30)
            os.write(w, result.reason.encode())
        finally:
            os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    reason = os.read(r, 4096).decode()
    os.close(r)
    assert reason == (
        f"cannot read heartbeat file {tmp_path / HEARTBEAT_FILE}: Permission denied "
        "(run as the supervisor's user or root)"
    )


# --- runner health --component: the server, and auto for a container's HEALTHCHECK ---------


@pytest.mark.parametrize(
    ("cmdline", "component"),
    [
        (b"/opt/privsep/venv/bin/python3\0/opt/privsep/venv/bin/runner\0server\0", "server"),
        (b"runner\0--config\0/etc/privsep/s.toml\0supervisor\0", "supervisor"),
        (b"/sbin/docker-init\0--\0runner\0server\0", "server"),
        (b"/opt/privsep/venv/bin/runner\0token-refresher\0", "token-refresher"),
        (b"runner\0db\0upgrade\0", None),
        (b"runner\0supervisors\0list\0", None),
        (b"/bin/sh\0-c\0server\0", None),
        (b"", None),
    ],
)
def test_component_of_pid1(cmdline: bytes, component: str | None) -> None:
    from privsep.runner.cli.health import component_of

    assert component_of(cmdline) == component


def _health(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("PRIVSEP")}
    return subprocess.run(
        [sys.executable, "-m", "privsep", "health", *args],
        env={**base, "PRIVSEP_HOME": str(tmp_path), **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_auto_outside_a_container_says_what_pid1_runs(tmp_path: Path) -> None:
    done = _health(tmp_path, "--component", "auto")
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("runner: --component auto: PID 1 runs no runner component")
