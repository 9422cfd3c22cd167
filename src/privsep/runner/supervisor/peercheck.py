"""Who is on the other end of a credential socket: ``SO_PEERCRED`` plus a process-tree walk.

The credential socket answers only the sandbox it belongs to. The kernel tells us the uid and
pid of the process that called ``connect()`` (``SO_PEERCRED``, pids translated into our PID
namespace, so a sandbox's PID-1 child shows up with its host pid). The uid must be the
sandbox's. The pid must descend from the sandbox's root process, which we learn by walking
``ppid`` links in ``/proc/<pid>/stat``.

A pid is only a number, and numbers get reused. Three guards keep a reused pid from passing:

* **The root.** :class:`ProcessRecord` keeps the root's start time (field 22 of
  ``/proc/<pid>/stat``) and a pidfd. Every check requires the pidfd to report the root alive
  and the start time under that pid to be unchanged, so a new process that inherited the
  root's pid is not the root.
* **The ancestors.** A parent starts no later than its child. A walk step that reaches a
  process younger than the one it came from has followed a pid that was freed and reused, and
  the check fails.
* **The peer itself.** We hold a pidfd on the process that connected before reading its
  ``/proc`` entry, and require it still alive after the walk: while it lives its pid cannot be
  reused, so the ``/proc`` data we read was its own. ``SO_PEERPIDFD`` (Linux 6.5+) gives the
  pidfd of the exact process that called ``connect()``. Without it we fall back to
  ``pidfd_open(pid)`` plus "started no later than we accepted the connection", which rules out
  any process born after the connection, at clock-tick granularity.

Everything here reads ``/proc`` and returns or raises; nothing logs, nothing touches secrets.
"""

from __future__ import annotations

import contextlib
import errno
import os
import platform
import select
import socket
import struct
import time
from dataclasses import dataclass
from typing import Final, NamedTuple

_UCRED = struct.Struct("3i")
_CLK_TCK: Final = os.sysconf("SC_CLK_TCK")
MAX_DEPTH: Final = 512
"""The longest ancestor chain walked before giving up; sandboxes are shallow trees."""

# SO_PEERPIDFD is 77 in asm-generic (x86, arm, arm64, riscv, s390, ...); a few architectures
# number socket options differently, and there we simply use the fallback.
_GENERIC_SOCKOPT_ARCHES = ("x86_64", "i386", "i686", "aarch64", "arm", "riscv", "s390", "ppc")
_SO_PEERPIDFD: int | None = getattr(socket, "SO_PEERPIDFD", None)
if _SO_PEERPIDFD is None and platform.machine().startswith(_GENERIC_SOCKOPT_ARCHES):
    _SO_PEERPIDFD = 77


class PeerRejected(Exception):
    """The peer is not (provably) a process of this sandbox; ``str()`` says why, for the log."""


class ProcStat(NamedTuple):
    """The fields of ``/proc/<pid>/stat`` the walk needs."""

    pid: int
    ppid: int
    start_ticks: int
    state: str


@dataclass(frozen=True)
class PeerCred:
    """``struct ucred`` as the kernel recorded it at ``connect()`` time."""

    pid: int
    uid: int
    gid: int


def read_stat(pid: int) -> ProcStat:
    """Parse ``/proc/<pid>/stat``. Raises :class:`ProcessLookupError` if there is no such pid.

    ``comm`` (field 2) may contain spaces and parentheses, so the fixed fields are taken from
    after its *last* ``)``.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        raise ProcessLookupError(f"no process {pid}") from None
    rest = data[data.rindex(b")") + 2 :].split()
    # rest[0] is field 3 (state), so field N is rest[N - 3].
    return ProcStat(pid=pid, ppid=int(rest[1]), start_ticks=int(rest[19]), state=rest[0].decode())


def boottime_ticks() -> int:
    """Now, in the clock ``/proc/<pid>/stat`` start times use (boot time, clock ticks)."""
    return int(time.clock_gettime(time.CLOCK_BOOTTIME) * _CLK_TCK)


def pidfd_alive(fd: int) -> bool:
    """A pidfd polls readable once its process has exited (zombies included)."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return not poller.poll(0)


def _pidfd_open(pid: int) -> int | None:
    """A pidfd for ``pid``, or ``None`` where the kernel or Python lacks ``pidfd_open``."""
    opener = getattr(os, "pidfd_open", None)
    if opener is None:
        return None
    try:
        fd: int = opener(pid)
    except OSError as exc:
        if exc.errno in (errno.ENOSYS, errno.EPERM):
            return None
        raise ProcessLookupError(f"no process {pid}") from None
    return fd


class ProcessRecord:
    """A sandbox's root process, pinned: pid, start time, and a pidfd where available.

    Built once (:meth:`capture`) when the sandbox is launched; :meth:`check` then proves, each
    time, that the pid still names that same process.
    """

    __slots__ = ("_pidfd", "pid", "start_ticks")

    def __init__(self, pid: int, start_ticks: int, pidfd: int | None) -> None:
        self.pid = pid
        self.start_ticks = start_ticks
        self._pidfd = pidfd

    @classmethod
    def capture(cls, pid: int) -> ProcessRecord:
        """Pin ``pid`` now. Raises :class:`ProcessLookupError` if it is gone or a zombie.

        The pidfd is opened *before* ``/proc`` is read and checked alive *after*, so the start
        time recorded belongs to the process the pidfd holds.
        """
        if pid <= 1:
            raise ValueError(f"{pid} cannot be a sandbox's root process")
        fd = _pidfd_open(pid)
        try:
            st = read_stat(pid)
            if st.state in ("Z", "X") or (fd is not None and not pidfd_alive(fd)):
                raise ProcessLookupError(f"process {pid} has already exited")
        except BaseException:
            if fd is not None:
                os.close(fd)
            raise
        return cls(pid, st.start_ticks, fd)

    def check(self) -> None:
        """Raise :class:`PeerRejected` unless the recorded root still runs under its pid."""
        if self._pidfd is not None and not pidfd_alive(self._pidfd):
            raise PeerRejected(f"the sandbox's root process {self.pid} has exited")
        try:
            st = read_stat(self.pid)
        except ProcessLookupError:
            raise PeerRejected(f"the sandbox's root process {self.pid} has exited") from None
        if st.start_ticks != self.start_ticks:
            raise PeerRejected(
                f"pid {self.pid} is no longer the sandbox's root process (start time changed)"
            )

    def close(self) -> None:
        """Release the pidfd. Idempotent."""
        fd, self._pidfd = self._pidfd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

    def __repr__(self) -> str:
        return f"ProcessRecord(pid={self.pid}, start_ticks={self.start_ticks})"


def peer_cred(sock: socket.socket) -> PeerCred:
    """``SO_PEERCRED`` of a connected unix socket."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    return PeerCred(pid=pid, uid=uid, gid=gid)


def _peer_pidfd(sock: socket.socket, pid: int, accepted_ticks: int) -> int:
    """A pidfd on the process that connected, by the strongest means this kernel offers."""
    if _SO_PEERPIDFD is not None:
        try:
            fd = sock.getsockopt(socket.SOL_SOCKET, _SO_PEERPIDFD)
        except OSError as exc:
            if exc.errno != errno.ENOPROTOOPT:
                # EINVAL / ESRCH: the connecting process has already been reaped.
                raise PeerRejected(f"the connecting process {pid} has exited") from None
        else:
            return fd
    fd_or_none = _pidfd_open(pid)
    if fd_or_none is None:
        raise PeerRejected("this kernel offers no pidfd: cannot pin the connecting process")
    try:
        # Fallback only: whatever holds the pid now must have existed when we accepted.
        if read_stat(pid).start_ticks > accepted_ticks + 1:
            raise PeerRejected(f"pid {pid} was reused after the connection was made")
    except ProcessLookupError:
        os.close(fd_or_none)
        raise PeerRejected(f"the connecting process {pid} has exited") from None
    except BaseException:
        os.close(fd_or_none)
        raise
    return fd_or_none


def check_peer(
    sock: socket.socket, *, uid: int, root: ProcessRecord, accepted_ticks: int
) -> PeerCred:
    """Return the peer's credentials if it is a process of this sandbox, else raise
    :class:`PeerRejected` with the reason.

    ``uid`` is the sandbox uid; ``root`` the sandbox's pinned root process;
    ``accepted_ticks`` the :func:`boottime_ticks` at ``accept()`` (used only without
    ``SO_PEERPIDFD``).
    """
    cred = peer_cred(sock)
    if cred.uid != uid:
        raise PeerRejected(f"peer uid {cred.uid} is not the sandbox uid {uid} (pid {cred.pid})")
    if cred.pid <= 0:
        raise PeerRejected("the kernel reported no pid for the peer (another PID namespace?)")
    fd = _peer_pidfd(sock, cred.pid, accepted_ticks)
    try:
        _walk_to_root(cred.pid, root)
        root.check()
        if not pidfd_alive(fd):
            raise PeerRejected(f"the connecting process {cred.pid} exited during the check")
    finally:
        os.close(fd)
    return cred


def _walk_to_root(pid: int, root: ProcessRecord) -> None:
    """Follow ``ppid`` from ``pid`` up to ``root.pid``; raise :class:`PeerRejected` if the
    chain ends elsewhere, or if a step reaches a process younger than the one it left."""
    try:
        st = read_stat(pid)
    except ProcessLookupError:
        raise PeerRejected(f"the connecting process {pid} has exited") from None
    if st.state in ("Z", "X"):
        raise PeerRejected(f"the connecting process {pid} has exited")
    if pid == root.pid:
        if st.start_ticks != root.start_ticks:
            raise PeerRejected(f"pid {pid} is no longer the sandbox's root process")
        return
    for _ in range(MAX_DEPTH):
        parent = st.ppid
        if parent == root.pid:
            if root.start_ticks > st.start_ticks:
                raise PeerRejected(f"pid {pid}'s ancestor {parent} is younger than its child")
            return
        if parent <= 1:
            raise PeerRejected(f"pid {pid} is not in the sandbox's process tree (root {root.pid})")
        try:
            up = read_stat(parent)
        except ProcessLookupError:
            raise PeerRejected(f"pid {pid}'s ancestor {parent} exited during the check") from None
        if up.start_ticks > st.start_ticks:
            raise PeerRejected(f"pid {pid}'s ancestor {parent} was reused (younger than its child)")
        st = up
    raise PeerRejected(f"pid {pid} has more than {MAX_DEPTH} ancestors below pid 1")
