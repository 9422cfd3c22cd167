"""One sandbox's credential socket: its place on disk, its state and its token.

A :class:`SocketEntry` is what the supervisor's other threads hold and call (bind the sandbox's
process, set or refresh its token, end it); the loop thread reads it to decide what a
connection may have. Kept apart from the connection code so that the cross-thread half (a lock,
state changes) and the loop-thread half (sockets, frames) can each be read on its own.

The socket's directory is made and handed over here too, because the order of those steps is
what keeps another user from swapping the node under us.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import stat
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

from privsep._token import Token
from privsep.runner.supervisor.credtable import Counters, SandboxState
from privsep.runner.supervisor.peercheck import ProcessRecord

if TYPE_CHECKING:
    from privsep.runner.supervisor.credconn import Conn

SOCKET_NAME: Final = "cred.sock"
_SUN_PATH_MAX = 107  # sizeof(sun_path) - 1 for the NUL
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class SocketEntry:
    """One sandbox's credential socket. Methods may be called from any thread.

    Made by :meth:`CredentialServer.open_socket`; :attr:`path` goes into the sandbox's spec.
    """

    def __init__(
        self,
        wake: Callable[[SocketEntry], None],
        sandbox_id: str,
        directory: str,
        path: str,
        listener: socket.socket,
        uid: int | None,
        gid: int | None,
    ) -> None:
        self._wake = wake  # the server re-examines parked connections on the loop thread
        self.sandbox_id = sandbox_id
        self.directory = directory
        self.path = path
        self._listener = listener
        self._lock = threading.Lock()
        self._state = SandboxState.WAITING
        self._uid = uid
        self._gid = gid
        self._root: ProcessRecord | None = None
        self._token: Token | None = None
        self._expires_at = 0
        self._closed = False
        self._conns: set[Conn] = set()  # loop thread only
        self._warned: dict[str, tuple[float, int]] = {}  # loop thread only
        self.counters = Counters()

    @classmethod
    def listen(
        cls,
        wake: Callable[[SocketEntry], None],
        sandbox_id: str,
        place: tuple[str, str],
        *,
        backlog: int,
        uid: int | None,
        gid: int | None,
    ) -> SocketEntry:
        """Listen at ``place`` (directory, socket path; see :func:`listen_at`) and make the
        entry that serves it."""
        directory, path = place
        listener = listen_at(directory, path, backlog=backlog, uid=uid, gid=gid)
        return cls(wake, sandbox_id, directory, path, listener, uid, gid)

    @property
    def state(self) -> SandboxState:
        return self._state

    @property
    def uid(self) -> int | None:
        """The sandbox uid peers must have (``None`` until known)."""
        return self._uid

    @property
    def root_pid(self) -> int | None:
        return self._root.pid if self._root is not None else None

    def bind_process(self, pid: int, uid: int | None = None, gid: int | None = None) -> None:
        """Record the sandbox's root process once it has launched. With a token also set
        (before or after, in either order), the entry is RUNNING and connections are checked
        against the process's tree, parked ones at once.

        ``uid``/``gid`` are the sandbox's, if :meth:`CredentialServer.open_socket` did not get
        them (a backend that picks the uid at launch): the directory and socket are handed to
        that uid now. Raises :class:`ProcessLookupError` if ``pid`` has already exited, and
        :class:`RuntimeError` if a process was already bound or the entry has ended.
        """
        with self._lock:
            self._check_bindable(pid)
            if uid is None and self._uid is None:
                raise ValueError(
                    f"credential socket {self.sandbox_id}: the sandbox uid is not known; "
                    "pass it to open_socket() or bind_process()"
                )
            if uid is not None and self._uid is not None and uid != self._uid:
                raise ValueError(
                    f"credential socket {self.sandbox_id}: bind_process uid {uid} differs from "
                    f"the uid {self._uid} the socket was opened for"
                )
            chown = self._uid is None
        record = ProcessRecord.capture(pid)
        try:
            if chown:
                assert uid is not None  # noqa: S101 - checked above
                _hand_over(self.directory, self.path, uid, gid)
            with self._lock:
                self._check_bindable(pid)
                if chown:
                    self._uid, self._gid = uid, gid
                self._root = record
                ready = self._become_running()
        except BaseException:
            record.close()
            raise
        if ready:
            self._wake(self)

    def _check_bindable(self, pid: int) -> None:
        if self._closed or self._state is not SandboxState.WAITING:
            raise RuntimeError(
                f"credential socket {self.sandbox_id}: cannot bind process {pid} while "
                f"{self._state.value}"
            )
        if self._root is not None:
            raise RuntimeError(
                f"credential socket {self.sandbox_id}: process {self._root.pid} is already bound"
            )

    def _become_running(self) -> bool:
        """WAITING → RUNNING once there is both a process and a token (lock held).

        Waiting for both, not just the process, means a child that connects early is parked
        until it can be answered with its token, whichever of ``bind_process`` and
        ``set_token`` the supervisor calls first, instead of being refused in between.
        """
        if (
            self._state is SandboxState.WAITING
            and self._root is not None
            and self._token is not None
        ):
            self._state = SandboxState.RUNNING
            return True
        return False

    def set_token(self, token: str, expires_at: int) -> bool:
        """Install or refresh the token handed out from now on. Returns False (and keeps
        nothing) once the entry has ended, so a refresh racing the end is harmless."""
        if not isinstance(token, str) or not token:
            raise ValueError("token must be a non-empty string")
        if isinstance(expires_at, bool) or not isinstance(expires_at, int):
            raise ValueError("expires_at must be integer Unix seconds")
        with self._lock:
            if self._state is SandboxState.ENDED or self._closed:
                return False
            self._token = Token(token, expires_at)
            self._expires_at = expires_at
            ready = self._become_running()
        if ready:
            self._wake(self)
        return True

    def end(self) -> None:
        """The work item is over: drop the token; ``token`` is now answered ``no_token`` and
        ``proxy`` is out of turn. Idempotent."""
        with self._lock:
            if self._state is SandboxState.ENDED:
                return
            self._state = SandboxState.ENDED
            self._token = None
        self._wake(self)

    def _snapshot(self) -> tuple[SandboxState, Token | None, int]:
        with self._lock:
            return self._state, self._token, self._expires_at

    def __repr__(self) -> str:
        token = "set" if self._token is not None else "none"
        return (
            f"<SocketEntry {self.sandbox_id} {self._state.value} path={self.path!r} "
            f"uid={self._uid} root={self.root_pid} token={token}>"
        )


def _hand_over(directory: str, path: str, uid: int, gid: int | None) -> None:
    """Give the socket, then its directory, to the sandbox uid. The directory is still 0700
    and ours while the socket changes hands, so nobody can swap the node under us."""
    g = -1 if gid is None else gid
    os.chown(path, uid, g, follow_symlinks=False)
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.fchown(fd, uid, g)
        os.fchmod(fd, 0o700)
    finally:
        os.close(fd)


def _check_directory_root(root: str) -> None:
    """Refuse a parent directory someone else could write: they could swap our directory."""
    if not os.path.isabs(root):
        raise ValueError(f"credential socket directory root {root!r} must be an absolute path")
    st = os.lstat(root)
    if not stat.S_ISDIR(st.st_mode):
        raise NotADirectoryError(f"credential socket directory root {root} is not a directory")
    if st.st_uid not in (0, os.geteuid()) or st.st_mode & 0o022:
        raise PermissionError(
            f"credential socket directory root {root} must be owned by root or uid "
            f"{os.geteuid()} and not writable by group or others (mode "
            f"{stat.S_IMODE(st.st_mode):04o}, owner {st.st_uid})"
        )


def socket_place(directory_root: str, sandbox_id: str) -> tuple[str, str]:
    """The directory and socket path for ``sandbox_id`` under ``directory_root``, after
    checking the id, the root and the length of the path."""
    if not isinstance(sandbox_id, str) or not _ID_RE.match(sandbox_id):
        raise ValueError(f"sandbox_id {sandbox_id!r} is not a safe identifier")
    _check_directory_root(directory_root)
    directory = os.path.join(directory_root, sandbox_id)
    path = os.path.join(directory, SOCKET_NAME)
    if len(os.fsencode(path)) > _SUN_PATH_MAX:
        raise ValueError(
            f"credential socket path {path} is {len(os.fsencode(path))} bytes, over the "
            f"{_SUN_PATH_MAX}-byte limit of a unix socket address: use a shorter "
            "directory_root"
        )
    return directory, path


def listen_at(
    directory: str, path: str, *, backlog: int, uid: int | None, gid: int | None
) -> socket.socket:
    """Make ``directory`` (0700) and a listening socket at ``path`` (0600) in it, handed to
    ``uid``/``gid`` if given. On failure nothing is left behind.

    The socket is not born 0600 through the umask, because the umask is process-wide and the
    supervisor is threaded; the directory nobody else can enter covers the moment between
    ``bind()`` and ``chmod()``.
    """
    os.mkdir(directory, 0o700)
    listener: socket.socket | None = None
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            os.fchmod(fd, 0o700)  # mkdir's mode went through the umask
        finally:
            os.close(fd)
        listener = socket.socket(
            socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
        )
        listener.bind(path)
        os.chmod(path, 0o600, follow_symlinks=False)
        listener.listen(backlog)
        if uid is not None:
            _hand_over(directory, path, uid, gid)
    except BaseException:
        if listener is not None:
            listener.close()
        shutil.rmtree(directory, ignore_errors=True)
        raise
    return listener


__all__ = ["SOCKET_NAME", "SocketEntry", "listen_at", "socket_place"]
