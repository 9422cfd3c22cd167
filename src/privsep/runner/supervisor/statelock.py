"""One supervisor per state directory.

Two supervisors on one state directory share its uid pool, its sandbox cgroups, its orphan
records and its identity on the server, and each undoes the other: the second kills the first's
sandboxes as orphans of an earlier run, tells the server that everything the supervisor held
died, and races it for the same cgroups. So the supervisor holds an exclusive ``flock`` on
``STATE_DIR/supervisor.lock`` for as long as it runs, taken before it touches any of that, and
a second one stops at once with one line naming the holder. The kernel drops the lock when the
holder dies, however it dies, so a SIGKILLed supervisor never leaves a stale lock behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from privsep.runner.errors import CommandError

LOCK_FILE = "supervisor.lock"


def hold_state_lock(state_dir: Path) -> int:
    """Take the state directory's lock for the life of this process; the descriptor that
    holds it (close-on-exec; the zygote and the sandboxes close it anyway). Raises
    :class:`CommandError` if another process holds it."""
    path = state_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = b""
        with contextlib.suppress(OSError):
            holder = os.pread(fd, 32, 0).strip()
        os.close(fd)
        who = f"process {holder.decode(errors='replace')}" if holder else "another process"
        raise CommandError(
            f"another supervisor ({who}) already runs on {state_dir}; stop it first, or give "
            "this one its own core.state_dir"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd
