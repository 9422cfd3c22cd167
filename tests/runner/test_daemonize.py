"""``daemonize``: real launches of a real daemon, checked from outside through /proc.

The container's pid 1 may or may not reap orphans, so "detached" is asserted as what it means:
the launcher returns at once, and the daemon is in a new session that it does not lead (it can
never acquire a controlling terminal), has no terminal, and its parent is not the launcher.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from privsep.runner.supervisor.daemonize import LOG_MODE, running_pid

# The daemon: detaches, writes to stdout and stderr, creates a file and a directory, then idles.
DAEMON = """
import os, sys, time
from privsep.runner.supervisor.daemonize import DaemonizeError, daemonize

pidfile, logfile, workdir = sys.argv[1:4]
try:
    daemonize(pidfile, logfile)
except DaemonizeError as exc:
    print(f"privsep: {exc}", file=sys.stderr)
    sys.exit(exc.code)
print("daemon started", os.getpid())
print("a line on stderr", file=sys.stderr)
with open(os.path.join(workdir, "created-file"), "w") as f:
    f.write("x")
os.mkdir(os.path.join(workdir, "created-dir"))
time.sleep(60)
"""

LAUNCH_TIMEOUT = 10.0


def _alive(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


def wait_for(predicate: Callable[[], object], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


class Launch:
    """One ``python -c DAEMON`` launch and what it left behind."""

    def __init__(self, pidfile: Path, logfile: Path, workdir: Path) -> None:
        self.pidfile, self.logfile, self.workdir = pidfile, logfile, workdir
        started = time.monotonic()
        with subprocess.Popen(
            [sys.executable, "-c", DAEMON, str(pidfile), str(logfile), str(workdir)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=workdir,
        ) as launcher:
            self.launcher_pid = launcher.pid
            # Returns once the pipes close: the daemon must not keep the launcher's stdio.
            stdout, stderr = launcher.communicate(timeout=LAUNCH_TIMEOUT)
        self.proc = subprocess.CompletedProcess(launcher.args, launcher.returncode, stdout, stderr)
        self.elapsed = time.monotonic() - started

    def daemon_pid(self) -> int:
        def written() -> bool:
            try:
                return self.pidfile.read_text().endswith("\n")
            except FileNotFoundError:
                return False

        wait_for(written, f"pid file {self.pidfile}")
        return int(self.pidfile.read_text())

    def wait_log(self, text: str) -> str:
        wait_for(lambda: self.logfile.exists() and text in self.logfile.read_text(), repr(text))
        return self.logfile.read_text()


@pytest.fixture
def launch(tmp_path: Path) -> Iterator[Callable[..., Launch]]:
    """Launch daemons; any still running at the end is killed."""
    launched: list[Launch] = []

    def _launch(pidfile: Path | None = None, logfile: Path | None = None) -> Launch:
        work = tmp_path / f"work{len(launched)}"
        work.mkdir()
        one = Launch(pidfile or tmp_path / "runner.pid", logfile or tmp_path / "runner.log", work)
        launched.append(one)
        return one

    yield _launch
    for one in launched:
        for proc in psutil.process_iter(["cmdline"]):
            if str(one.workdir) in (proc.info["cmdline"] or []):
                proc.kill()


def test_daemon_detaches_and_keeps_its_promises(launch: Callable[..., Launch]) -> None:
    one = launch()
    assert one.proc.returncode == 0, one.proc.stderr
    assert one.elapsed < 5  # the launcher did not wait for the daemon
    assert one.proc.stdout == ""
    pid = one.daemon_pid()
    log = one.wait_log("a line on stderr")
    assert f"daemon started {pid}\n" in log

    proc = psutil.Process(pid)
    assert proc.is_running()
    # Detached: a new session it does not lead, no terminal, not the launcher's child.
    assert os.getsid(pid) != os.getsid(0)
    assert os.getsid(pid) != pid
    assert os.getpgid(pid) != os.getpgid(0)
    assert proc.terminal() is None
    assert proc.ppid() not in (one.launcher_pid, os.getpid())
    assert proc.cwd() == "/"

    # umask 027, seen by the kernel and in what the daemon creates.
    with open(f"/proc/{pid}/status") as f:
        umask = next(line.split()[1] for line in f if line.startswith("Umask:"))
    assert int(umask, 8) == 0o027
    wait_for(lambda: (one.workdir / "created-dir").exists(), "created-dir")
    assert stat.S_IMODE((one.workdir / "created-file").stat().st_mode) == 0o640
    assert stat.S_IMODE((one.workdir / "created-dir").stat().st_mode) == 0o750

    # The pid file and the log are not readable by others.
    assert stat.S_IMODE(one.pidfile.stat().st_mode) & 0o027 == 0
    assert stat.S_IMODE(one.logfile.stat().st_mode) == LOG_MODE

    # No stdin; stdout and stderr are the log; nothing else inherited from the launcher.
    fds = {int(fd): os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
    assert fds == {0: "/dev/null", 1: str(one.logfile), 2: str(one.logfile)}
    with open(f"/proc/{pid}/fdinfo/1") as f:
        flags = int(next(line.split()[1] for line in f if line.startswith("flags:")), 8)
    assert flags & os.O_APPEND


def test_sigterm_removes_the_pid_file(launch: Callable[..., Launch]) -> None:
    one = launch()
    pid = one.daemon_pid()
    one.wait_log("a line on stderr")
    os.kill(pid, signal.SIGTERM)
    wait_for(lambda: not one.pidfile.exists(), "the pid file to go")
    wait_for(lambda: not _alive(pid), "the daemon to exit")
    assert "Terminating on signal 15" in one.logfile.read_text()


def test_second_daemon_is_refused_while_the_first_runs(
    launch: Callable[..., Launch], tmp_path: Path
) -> None:
    first = launch()
    pid = first.daemon_pid()
    second = launch(logfile=tmp_path / "second.log")
    assert second.proc.returncode == 1
    assert second.proc.stderr == (
        f"privsep: pid file {first.pidfile} names running process {pid}: is a supervisor "
        f"already running? (stop it first, or remove {first.pidfile} if pid {pid} is not a "
        "supervisor)\n"
    )
    assert second.elapsed < 5
    assert int(first.pidfile.read_text()) == pid
    assert _alive(pid)
    assert not (tmp_path / "second.log").exists()


def test_stale_pid_file_from_a_killed_daemon_is_replaced(
    launch: Callable[..., Launch],
) -> None:
    first = launch()
    old = first.daemon_pid()
    os.kill(old, signal.SIGKILL)  # no chance to clean up
    wait_for(lambda: not _alive(old), "the daemon to die")
    assert first.pidfile.exists()

    second = launch()
    assert second.proc.returncode == 0, second.proc.stderr
    assert f"removing stale pid file {first.pidfile}" in second.proc.stderr
    new = second.daemon_pid()  # the launcher removed the stale file; the daemon wrote this
    assert new != old
    assert _alive(new)


def test_garbage_pid_file_is_stale(launch: Callable[..., Launch], tmp_path: Path) -> None:
    (tmp_path / "runner.pid").write_text("not a pid\n")
    one = launch()
    assert one.proc.returncode == 0, one.proc.stderr
    assert _alive(one.daemon_pid())


def test_existing_log_is_appended_and_tightened(
    launch: Callable[..., Launch], tmp_path: Path
) -> None:
    log = tmp_path / "runner.log"
    log.write_text("earlier run\n")
    os.chmod(log, 0o666)
    one = launch()
    text = one.wait_log("daemon started")
    assert text.startswith("earlier run\n")
    assert stat.S_IMODE(log.stat().st_mode) == LOG_MODE


def test_unopenable_log_is_refused_before_detaching(
    launch: Callable[..., Launch], tmp_path: Path
) -> None:
    one = launch(logfile=tmp_path / "missing" / "runner.log")
    assert one.proc.returncode == 1
    assert one.proc.stderr == (
        f"privsep: cannot open log file {tmp_path}/missing/runner.log: No such file or directory\n"
    )
    assert not one.pidfile.exists()


def test_missing_pid_directory_is_refused_before_detaching(
    launch: Callable[..., Launch], tmp_path: Path
) -> None:
    one = launch(pidfile=tmp_path / "run" / "runner.pid")
    assert one.proc.returncode == 1
    assert one.proc.stderr == (
        f"privsep: cannot write pid file {tmp_path}/run/runner.pid: "
        f"directory {tmp_path}/run is missing\n"
    )
    assert not (tmp_path / "runner.log").exists()


# --- running_pid, in-process ----------------------------------------------------------------


def test_running_pid_names_a_live_writer(tmp_path: Path) -> None:
    pidfile = tmp_path / "p.pid"
    pidfile.write_text(f"{os.getpid()}\n")
    assert running_pid(pidfile) == os.getpid()


def test_running_pid_ignores_a_reused_pid(tmp_path: Path) -> None:
    """A live process that started after the file was written cannot have written it."""
    pidfile = tmp_path / "p.pid"
    with subprocess.Popen(["sleep", "30"]) as newer:
        try:
            pidfile.write_text(f"{newer.pid}\n")
            hour_ago = time.time() - 3600
            os.utime(pidfile, (hour_ago, hour_ago))
            assert running_pid(pidfile) is None
        finally:
            newer.kill()


def test_running_pid_of_dead_missing_or_garbage(tmp_path: Path) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    pidfile = tmp_path / "p.pid"
    assert running_pid(pidfile) is None
    for content in (f"{dead.pid}\n", "", "x\n", "0\n", "-1\n"):
        pidfile.write_text(content)
        assert running_pid(pidfile) is None, content
