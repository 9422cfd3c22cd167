"""Exec a fresh Python with exactly the fds we choose and an empty environment.

``os.posix_spawn`` (vfork + exec in glibc) is used instead of ``fork()``: the supervisor may be
multi-threaded and holds secrets, and nothing of it should run in a child, not even briefly.
Only the fds named in ``fds`` are inherited (everything else Python opens is close-on-exec, and
the child closes stray fds again in ``enter()``).
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Mapping, Sequence

_HIGH_FD = 100


def devnull_fd() -> int:
    """A fresh read-write fd on /dev/null (close-on-exec)."""
    return os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)


def spawn_python(python: str, args: Sequence[str], fds: Mapping[int, int]) -> int:
    """Start ``python -I *args`` with ``fds`` (child fd → our fd) and no environment.

    Returns the pid. The caller owns the reaping (through a pidfd).
    """
    # Move every source out of the way of every target, so one dup2 cannot clobber the next.
    moved = {
        target: fcntl.fcntl(source, fcntl.F_DUPFD_CLOEXEC, _HIGH_FD)
        for target, source in fds.items()
    }
    try:
        actions = [(os.POSIX_SPAWN_DUP2, source, target) for target, source in moved.items()]
        return os.posix_spawn(python, [python, "-I", *args], {}, file_actions=actions)
    finally:
        for fd in moved.values():
            os.close(fd)
