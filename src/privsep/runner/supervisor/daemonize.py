"""``runner supervisor --daemon``: detach from the terminal on hosts without systemd.

Under systemd the supervisor stays in the foreground (``Type=notify``); this module is for the
rest. It wraps python-daemon's :class:`daemon.DaemonContext` (double fork, new session, no
controlling terminal, ``chdir /``, core dumps off) and adds what a secret-holding daemon needs:

- **umask 027** so nothing the supervisor creates (state, attempt logs) is readable by others;
- **a pid file** (python-daemon's ``TimeoutPIDLockFile``) that refuses a second supervisor, but
  not a stale file left by a ``kill -9``;
- **stdout/stderr appended to a log file** opened 0640, so a traceback is never lost to
  ``/dev/null``; stdin is ``/dev/null``.

Everything a person can get wrong (a pid file naming a live supervisor, a log file that can't
be opened) is checked *before* the fork, so the error reaches the terminal and the exit status.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import signal
import stat
import sys
from pathlib import Path
from typing import IO, Any

import daemon
import daemon.pidfile
import lockfile  # type: ignore[import-untyped]
import psutil

from privsep.runner.errors import CommandError

log = logging.getLogger("privsep.daemonize")

#: Log file mode: the supervisor's group (operators) may read it, others may not.
LOG_MODE = 0o640


class DaemonizeError(CommandError):
    """Detaching was refused: another supervisor runs, or a file can't be used."""


class _PidFile(daemon.pidfile.TimeoutPIDLockFile):  # type: ignore[misc]
    """``TimeoutPIDLockFile`` that only the process which wrote it removes.

    python-daemon releases the pid file from an ``atexit`` hook. A process forked from the
    daemon (a sandbox template, say) that exits through ``sys.exit`` runs the same hook; the
    stock class would raise ``NotMyLock`` there, and must certainly not delete the file.
    """

    def release(self) -> None:
        if self.read_pid() != os.getpid():
            return
        with contextlib.suppress(lockfile.NotLocked, lockfile.NotMyLock):
            super().release()


def _pid_alive(pid: int) -> bool:
    """Whether ``pid`` names a live, non-zombie process."""
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


def running_pid(pidfile: str | os.PathLike[str]) -> int | None:
    """The pid in ``pidfile`` if it names a process that could have written it, else ``None``.

    "Could have written it": alive, and started no later than the file was last modified. A
    process that started afterwards merely reuses the number of a supervisor that died without
    cleaning up (``kill -9``, power cut), and must not keep the next supervisor from starting.
    """
    try:
        st = os.stat(pidfile)
        with open(pidfile) as f:
            pid = int(f.readline().strip())
    except (OSError, ValueError):
        return None
    if pid <= 0 or not _pid_alive(pid):
        return None
    try:
        started = psutil.Process(pid).create_time()
    except psutil.Error:
        return pid
    # create_time comes from boot time plus jiffies: allow a little rounding.
    return None if started > st.st_mtime + 1.0 else pid


def _open_log(logfile: str | os.PathLike[str]) -> IO[str]:
    """Open the log for appending, creating it 0640; tighten an existing, looser file."""
    try:
        fd = os.open(
            logfile,
            os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW,
            LOG_MODE,
        )
    except OSError as exc:
        raise DaemonizeError(f"cannot open log file {logfile}: {exc.strerror or exc}") from exc
    try:
        mode = stat.S_IMODE(os.fstat(fd).st_mode)
        if mode & ~LOG_MODE:
            os.fchmod(fd, mode & LOG_MODE)
    except OSError as exc:
        os.close(fd)
        raise DaemonizeError(
            f"cannot restrict log file {logfile} to mode {LOG_MODE:o}: {exc.strerror or exc}"
        ) from exc
    return io.TextIOWrapper(io.FileIO(fd, "w", closefd=True), line_buffering=True)


def _claim_pidfile(path: Path) -> None:
    """Refuse if a supervisor holds ``path``; clear a stale file so the daemon can take it."""
    if not path.parent.is_dir():
        raise DaemonizeError(f"cannot write pid file {path}: directory {path.parent} is missing")
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise DaemonizeError(
            f"cannot write pid file {path}: directory {path.parent} is not writable"
        )
    pid = running_pid(path)
    if pid is not None:
        raise DaemonizeError(
            f"pid file {path} names running process {pid}: is a supervisor already running? "
            f"(stop it first, or remove {path} if pid {pid} is not a supervisor)"
        )
    if path.is_symlink() or path.exists():
        log.warning("removing stale pid file %s", path)
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise DaemonizeError(
                f"cannot remove stale pid file {path}: {exc.strerror or exc}"
            ) from exc


def daemonize(
    pidfile: str | os.PathLike[str],
    logfile: str | os.PathLike[str],
    *,
    umask: int = 0o027,
) -> daemon.DaemonContext:
    """Detach into the background and return the open :class:`daemon.DaemonContext`.

    When this returns, the caller is the daemon: grandchild of the launcher, in a new session
    with no controlling terminal, cwd ``/``, ``umask``, stdin on ``/dev/null``, stdout/stderr
    appended to ``logfile``, and its pid in ``pidfile``. The launcher has exited 0. All other
    file descriptors are closed, so open sockets and start threads *after* this call (fork
    keeps only the calling thread).

    The pid file is removed when the daemon exits normally (python-daemon's ``atexit`` hook),
    including on SIGTERM while python-daemon's handler is installed (it raises ``SystemExit``).
    The supervisor's own SIGTERM handler, installed later, replaces that one; the pid file is
    then removed when its loop returns and the interpreter exits. After ``kill -9`` the file
    stays; the next start sees it is stale and replaces it.

    Raises :class:`DaemonizeError` in the launcher for anything a person can fix. The
    remaining race (two launchers at once) is lost by the second daemon, which writes the
    reason to the log and exits 1.
    """
    pid_path = Path(os.path.abspath(pidfile))
    log_path = Path(os.path.abspath(logfile))  # cwd becomes / after the fork
    _claim_pidfile(pid_path)
    out = _open_log(log_path)
    sys.stdout.flush()
    sys.stderr.flush()
    context = daemon.DaemonContext(
        working_directory="/",
        umask=umask,
        detach_process=True,  # also when started by init: --daemon asked for it
        prevent_core=True,  # the supervisor holds a credential
        pidfile=_PidFile(str(pid_path), acquire_timeout=0),
        stdin=None,
        stdout=out,
        stderr=out,
        signal_map=_signal_map(),
    )
    try:
        context.open()
    except lockfile.AlreadyLocked:
        # In the daemon, after the launcher has returned: only the log can hear us.
        print(
            f"privsep: pid file {pid_path} was created by another supervisor starting at the "
            "same time; exiting",
            file=sys.stderr,
        )
        os._exit(1)
    except lockfile.LockError as exc:
        print(f"privsep: cannot write pid file {pid_path}: {exc}", file=sys.stderr)
        os._exit(1)
    finally:
        # The daemon's stdout/stderr are dup2'd copies of this descriptor now.
        out.close()
    # The streams are new file descriptors behind the old objects: make them line-buffered so
    # a message lands in the log when it is written, not when a buffer fills.
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(AttributeError, io.UnsupportedOperation, ValueError):
            stream.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    return context


def _signal_map() -> dict[int, Any]:
    """Only SIGTERM (python-daemon's ``terminate``: ``SystemExit``, so the pid file goes).

    python-daemon also ignores SIGTSTP/SIGTTIN/SIGTTOU by default. A daemon without a
    controlling terminal never receives them from one, and an ignored disposition survives
    ``exec``: every sandbox would start with job-control signals ignored.
    """
    return {signal.SIGTERM: "terminate"}


__all__ = ["LOG_MODE", "DaemonizeError", "daemonize", "running_pid"]
