"""The supervisor's side of the per-sandbox credential socket.

Each sandbox gets a unix socket, ``<directory_root>/<sandbox_id>/cred.sock``, in a 0700
directory of its own, and asks it for its work item's short-lived token (``token``) or, with no
network, for an API call made on its behalf (``proxy``). The protocol and its framing live in
:mod:`privsep.client._wire`, shared with the child; this module is the server.

One :class:`CredentialServer` serves every sandbox from a single ``selectors`` thread, so 500
sandboxes cost 500 listening sockets and one thread, not 500 threads. Only the proxied HTTP call
leaves that thread (a small pool), so a slow API never stalls another sandbox's token.

Every connection goes through, in order:

1. **Capacity.** At most ``max_connections`` open connections per sandbox; the rest are closed
   at once, so one sandbox cannot exhaust the supervisor's file descriptors.
2. **Peer check**, before a byte is read (:mod:`privsep.runner.supervisor.peercheck`): the
   ``SO_PEERCRED`` uid must be the sandbox uid, and the pid must descend from the sandbox's root
   process, in a
   way a reused pid cannot fool. A connection made while the entry is WAITING (no process
   bound or no token set yet) is *parked*: not checked, not read, until both are there, so a
   child that connects while the supervisor is still between ``launch()`` and
   ``bind_process()``/``set_token()`` is answered with its token instead of turned away (and
   gets nothing before it has been checked). A failed check closes the connection, is logged at
   warning and counted; it is not a violation, because the peer is not the sandbox.
3. **Framing**, bounded: the 4-byte length is checked against ``MAX_FRAME`` before any payload
   is read, and payload bytes are read only up to the announced length.
4. **The state table**, OpenSSH's monitor style (:data:`ALLOWED`). A request the current state
   does not allow, and any malformed, oversized, truncated or unknown frame, closes the
   connection and reports ``on_violation(sandbox_id, reason)``: across a trust boundary, a
   peer that speaks out of turn is hostile, and the supervisor kills the sandbox.

One request, one reply, in order; a connection may carry many exchanges. Each of these must
happen within ``idle_timeout`` or the connection is dropped (logged, counted, not a
violation): a parked connection being checked, a checked one sending its first request, any
frame being finished once started, any reply being read. Between exchanges a connection may
stay idle (the client SDK keeps one connection for its lifetime), bounded by the per-sandbox
cap.

The token is a secret: it is held in :class:`_Secret`, which no ``repr``, log line or exception
message shows, and is revealed only where the reply frame is built or the proxy handler called.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import heapq
import itertools
import logging
import os
import re
import selectors
import shutil
import socket
import stat
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any, Final

from privsep.client._exceptions import ProtocolError
from privsep.client._wire import (
    MAX_FRAME,
    METHODS,
    SERVER_UNAVAILABLE,
    ErrorReply,
    ProxyRequest,
    ProxyResponse,
    TokenReply,
    TokenRequest,
    ToSandbox,
    check_proxy_path,
    decode_payload,
    encode_frame,
    parse_request,
)
from privsep.runner.supervisor.peercheck import (
    PeerRejected,
    ProcessRecord,
    boottime_ticks,
    check_peer,
)

log = logging.getLogger("privsep.supervisor.credsock")

SOCKET_NAME: Final = "cred.sock"
DEFAULT_IDLE_TIMEOUT: Final = 10.0
DEFAULT_MAX_CONNECTIONS: Final = 16
DEFAULT_PROXY_WORKERS: Final = 16
NO_TOKEN: Final = "no_token"  # noqa: S105 - an error code, not a secret
"""``ErrorReply.code`` when there is no token to hand out (not issued yet, expired, ended)."""

_HEADER = struct.Struct(">I")
_RECV_CHUNK = 65536
_READS_PER_EVENT = 8  # then let other sockets have a turn
_ACCEPTS_PER_EVENT = 32
_SUN_PATH_MAX = 107  # sizeof(sun_path) - 1 for the NUL
_ACCEPT_PAUSE = 0.5  # after EMFILE/ENFILE: stop accepting on that socket for a moment
_WARN_INTERVAL = 1.0  # per socket and kind of event
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

ProxyHandler = Callable[[str, str, str, Any, str], tuple[int, Any]]
"""``proxy_handler(sandbox_id, method, path, body, token) -> (status, json_body)``, run off the
selector thread. ``sandbox_id`` says whose call it is, so the supervisor can note what a
sandbox reported (a task's own ``succeed``, say) without parsing its token. Raising
:class:`OSError` (which includes every ``requests`` exception and the supervisor's
``HttpUnavailable``) means "the API could not be reached" and becomes
``ErrorReply(code="server_unavailable")``. It must time out on its own: a call that never
returns holds one pool thread for good."""

ViolationHandler = Callable[[str, str], None]
"""``on_violation(sandbox_id, reason)``: the sandbox broke the protocol; the supervisor kills
it. Called on a thread of its own (never the selector thread), once per violation."""


class SandboxState(enum.Enum):
    """Where a sandbox's socket is in its life."""

    WAITING = "waiting"
    """No process bound or no token set yet: connections are parked, unchecked and unread."""
    RUNNING = "running"
    """Root process bound and token set: peers in its tree get the token and may proxy."""
    ENDED = "ended"
    """The work item is over (or the sandbox broke the protocol): its token is dropped;
    ``token`` is answered ``no_token``, ``proxy`` is out of turn."""


class Action(enum.Enum):
    """What the server does with a permitted request."""

    HAND_OUT = "hand_out"
    PROXY = "proxy"
    REFUSE_ENDED = "refuse_ended"


@dataclass(frozen=True)
class Rule:
    """One row of the state table: a permitted request and how it is answered."""

    action: Action


RequestType = type[TokenRequest] | type[ProxyRequest]

ALLOWED: Final[Mapping[SandboxState, Mapping[RequestType, Rule]]] = {
    # Nothing is read before there is a process to check peers against and a token to give:
    # connections wait unread (see the module doc), so nothing can be out of turn here.
    SandboxState.WAITING: {},
    SandboxState.RUNNING: {
        TokenRequest: Rule(Action.HAND_OUT),
        ProxyRequest: Rule(Action.PROXY),
    },
    # A child still asking for its token at the end gets a plain refusal; one still calling
    # the API through us after its work item ended is out of turn.
    SandboxState.ENDED: {TokenRequest: Rule(Action.REFUSE_ENDED)},
}
"""Per state, the requests a sandbox may make. Anything else closes the connection and is
reported through ``on_violation``."""


class _Secret:
    """A token that keeps itself out of ``repr``, ``str``, logs and pickles."""

    __slots__ = ("__value",)

    def __init__(self, value: str) -> None:
        self.__value = value

    def reveal(self) -> str:
        return self.__value

    def scrub(self, text: str) -> str:
        """``text`` with every copy of the token replaced, for messages that quote others'."""
        return text.replace(self.__value, "***") if self.__value else text

    def __repr__(self) -> str:
        return "<token ***>"

    __str__ = __repr__

    def __reduce__(self) -> Any:
        raise TypeError("a token cannot be pickled")


@dataclass
class Counters:
    """What happened on one socket (or, summed, on all of them). Written by the loop thread."""

    accepted: int = 0
    over_capacity: int = 0
    peer_rejected: int = 0
    timeouts: int = 0
    violations: int = 0
    tokens_served: int = 0
    refusals: int = 0
    proxied: int = 0
    proxy_unavailable: int = 0


class _Phase(enum.Enum):
    PARKED = "parked"  # accepted while WAITING: not checked, not read
    READ = "read"  # checked; reading a frame
    BUSY = "busy"  # a proxied call is in flight; not reading
    WRITE = "write"  # sending a reply; not reading
    CLOSED = "closed"


class _Conn:
    """One accepted connection. Owned by the loop thread."""

    __slots__ = (
        "accepted_ticks",
        "deadline_seq",
        "entry",
        "events",
        "header",
        "length",
        "out",
        "payload",
        "peer_pid",
        "phase",
        "sock",
    )

    def __init__(self, sock: socket.socket, entry: SocketEntry) -> None:
        self.sock = sock
        self.entry = entry
        self.phase = _Phase.PARKED
        self.events = 0
        self.header = bytearray()
        self.length = 0
        self.payload: bytearray | None = None
        self.out: memoryview | None = None
        self.deadline_seq = -1
        self.accepted_ticks = boottime_ticks()
        self.peer_pid = 0


class _Listener:
    __slots__ = ("entry",)

    def __init__(self, entry: SocketEntry) -> None:
        self.entry = entry


class SocketEntry:
    """One sandbox's credential socket. Methods may be called from any thread.

    Made by :meth:`CredentialServer.open_socket`; :attr:`path` goes into the sandbox's spec.
    """

    def __init__(
        self,
        server: CredentialServer,
        *,
        sandbox_id: str,
        directory: str,
        path: str,
        listener: socket.socket,
        uid: int | None,
        gid: int | None,
    ) -> None:
        self._server = server
        self.sandbox_id = sandbox_id
        self.directory = directory
        self.path = path
        self._listener = listener
        self._lock = threading.Lock()
        self._state = SandboxState.WAITING
        self._uid = uid
        self._gid = gid
        self._root: ProcessRecord | None = None
        self._token: _Secret | None = None
        self._expires_at = 0
        self._closed = False
        self._conns: set[_Conn] = set()  # loop thread only
        self._warned: dict[str, tuple[float, int]] = {}  # loop thread only
        self.counters = Counters()

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
            self._server._wake_entry(self)

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
            self._token = _Secret(token)
            self._expires_at = expires_at
            ready = self._become_running()
        if ready:
            self._server._wake_entry(self)
        return True

    def end(self) -> None:
        """The work item is over: drop the token; ``token`` is now answered ``no_token`` and
        ``proxy`` is out of turn. Idempotent."""
        with self._lock:
            if self._state is SandboxState.ENDED:
                return
            self._state = SandboxState.ENDED
            self._token = None
        self._server._wake_entry(self)

    def _snapshot(self) -> tuple[SandboxState, _Secret | None, int]:
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


class CredentialServer:
    """Serves every sandbox's credential socket from one selector thread.

    ``proxy_handler`` makes proxied API calls (``None``: ``proxy`` is answered with an error);
    ``on_violation`` is told when a sandbox breaks the protocol. ``idle_timeout`` bounds how
    long a connection may hold a descriptor without making progress (see the module doc);
    ``max_connections`` caps open connections per sandbox; ``proxy_workers`` sizes the pool
    that runs ``proxy_handler``.
    """

    def __init__(
        self,
        *,
        proxy_handler: ProxyHandler | None = None,
        on_violation: ViolationHandler | None = None,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        proxy_workers: int = DEFAULT_PROXY_WORKERS,
        backlog: int = DEFAULT_MAX_CONNECTIONS,
    ) -> None:
        if idle_timeout <= 0 or max_connections < 1 or proxy_workers < 1 or backlog < 1:
            raise ValueError("idle_timeout, max_connections, proxy_workers, backlog must be > 0")
        self._proxy_handler = proxy_handler
        self._on_violation = on_violation
        self.idle_timeout = idle_timeout
        self.max_connections = max_connections
        self._backlog = backlog
        self._entries: dict[str, SocketEntry] = {}
        self._reserved: set[str] = set()
        self._lock = threading.Lock()
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._commands: deque[Callable[[], None]] = deque()
        self._wake_pending = False
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._proxy_pool = ThreadPoolExecutor(
            max_workers=proxy_workers, thread_name_prefix="privsep-credsock-proxy"
        )
        self._notify_pool = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="privsep-credsock-notify"
        )
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._closed = False
        self._totals = Counters()

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the selector thread. Idempotent; :meth:`open_socket` calls it too."""
        with self._lock:
            if self._closed:
                raise RuntimeError("the credential server is closed")
            if self._thread is not None:
                return
            self._thread = threading.Thread(target=self._run, name="privsep-credsock", daemon=True)
            self._thread.start()

    def close(self) -> None:
        """Stop serving: every socket and connection is closed and every socket directory
        removed. In-flight proxied calls are abandoned (their replies are dropped)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            thread = self._thread
        self._stopping = True
        self._wake()
        if thread is not None:
            thread.join(timeout=10)
        with self._lock:
            ids = list(self._entries)
        for sandbox_id in ids:
            self.close_socket(sandbox_id)
        self._proxy_pool.shutdown(wait=False, cancel_futures=True)
        self._notify_pool.shutdown(wait=False)
        self._sel.close()
        self._wake_r.close()
        self._wake_w.close()

    stop = close

    def __enter__(self) -> CredentialServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- sockets --------------------------------------------------------------------------------

    def open_socket(
        self,
        sandbox_id: str,
        *,
        directory_root: str,
        uid: int | None = None,
        gid: int | None = None,
    ) -> SocketEntry:
        """Create ``<directory_root>/<sandbox_id>/cred.sock`` and start listening on it.

        The directory is created 0700 and stays ours while the socket is bound and set to
        0600, then both are handed to ``uid``/``gid`` (if given here; else at
        :meth:`SocketEntry.bind_process`). The socket is not born 0600 through the umask,
        because the umask is process-wide and the supervisor is threaded; the directory nobody
        else can enter covers the moment between ``bind()`` and ``chmod()``.
        """
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
        with self._lock:
            if self._closed:
                raise RuntimeError("the credential server is closed")
            if sandbox_id in self._entries or sandbox_id in self._reserved:
                raise ValueError(f"sandbox {sandbox_id} already has a credential socket")
            # Reserve the id while the filesystem work runs without the lock.
            self._reserved.add(sandbox_id)
        listener: socket.socket | None = None
        try:
            os.mkdir(directory, 0o700)
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
                listener.listen(self._backlog)
                if uid is not None:
                    _hand_over(directory, path, uid, gid)
            except BaseException:
                if listener is not None:
                    listener.close()
                shutil.rmtree(directory, ignore_errors=True)
                raise
        finally:
            with self._lock:
                self._reserved.discard(sandbox_id)
        assert listener is not None  # noqa: S101 - bound above or raised
        entry = SocketEntry(
            self,
            sandbox_id=sandbox_id,
            directory=directory,
            path=path,
            listener=listener,
            uid=uid,
            gid=gid,
        )
        with self._lock:
            self._entries[sandbox_id] = entry
        self._post(lambda: self._register_listener(entry))
        self.start()
        log.debug("credential socket %s: listening on %s", sandbox_id, path)
        return entry

    def close_socket(self, sandbox_id: str) -> None:
        """Close the sandbox's socket and connections, forget its token, and remove the
        socket and its directory. Unknown ids are ignored (idempotent)."""
        with self._lock:
            entry = self._entries.get(sandbox_id)
            if entry is None:
                return
            del self._entries[sandbox_id]
        with entry._lock:
            entry._closed = True
            entry._state = SandboxState.ENDED
            entry._token = None
        self._call_in_loop(lambda: self._drop_entry(entry))
        with contextlib.suppress(FileNotFoundError):
            os.unlink(entry.path)
        # The sandbox uid owns the directory and may have left things in it; rmtree works
        # through directory fds and does not follow symlinks.
        shutil.rmtree(entry.directory, ignore_errors=True)
        log.debug("credential socket %s: closed", sandbox_id)

    def entry(self, sandbox_id: str) -> SocketEntry | None:
        with self._lock:
            return self._entries.get(sandbox_id)

    def stats(self) -> dict[str, int]:
        """Totals over every socket this server has served, plus what is open now."""
        out = asdict(self._totals)
        with self._lock:
            entries = list(self._entries.values())
        out["open_sockets"] = len(entries)
        out["open_connections"] = sum(len(e._conns) for e in entries)
        return out

    # -- cross-thread plumbing ------------------------------------------------------------------

    def _wake(self) -> None:
        # One byte per turn of the loop is enough: a sandbox's start and end post several
        # commands in a row, and each send() was a syscall the loop then had to drain.
        if self._wake_pending:
            return
        self._wake_pending = True
        with contextlib.suppress(BlockingIOError, OSError):
            self._wake_w.send(b"\0")

    def _post(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the loop thread soon."""
        self._commands.append(fn)
        self._wake()

    def _loop_running(self) -> bool:
        t = self._thread
        return t is not None and t.is_alive() and not self._stopping

    def _call_in_loop(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the loop thread and wait for it (inline if we are that thread, or
        if the loop is not running)."""
        if threading.current_thread() is self._thread or not self._loop_running():
            fn()
            return
        done = threading.Event()

        def run() -> None:
            try:
                fn()
            finally:
                done.set()

        self._post(run)
        if not done.wait(timeout=10) and self._loop_running():
            log.error("credential server: the loop did not answer within 10 s")

    def _wake_entry(self, entry: SocketEntry) -> None:
        self._post(lambda: self._recheck_parked(entry))

    def _call_at(self, when: float, fn: Callable[[], None]) -> int:
        seq = next(self._seq)
        heapq.heappush(self._timers, (when, seq, fn))
        return seq

    # -- the loop -------------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping:
            try:
                self._turn()
            except Exception:
                # Never let one bad turn end the thread every sandbox depends on.
                log.error("credential server: unexpected error in the loop", exc_info=True)
                time.sleep(0.01)
        with self._lock:
            entries = list(self._entries.values())
        for entry in entries:
            with contextlib.suppress(Exception):
                self._drop_entry(entry)

    def _turn(self) -> None:
        timeout = 1.0
        if self._timers:
            timeout = min(timeout, max(0.0, self._timers[0][0] - time.monotonic()))
        for key, mask in self._sel.select(timeout):
            data = key.data
            try:
                if data is None:
                    self._drain_wake()
                elif isinstance(data, _Listener):
                    self._accept(data.entry)
                else:
                    self._on_event(data, mask)
            except Exception:
                log.error("credential server: error handling an event", exc_info=True)
                if isinstance(data, _Conn):
                    self._close(data)
        while self._commands:
            fn = self._commands.popleft()
            try:
                fn()
            except Exception:
                log.error("credential server: error in a loop command", exc_info=True)
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            _, _, fn = heapq.heappop(self._timers)
            try:
                fn()
            except Exception:
                log.error("credential server: error in a timer", exc_info=True)

    def _drain_wake(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while self._wake_r.recv(4096):
                pass
        # Cleared after draining (a byte drained here may be a later wake's, which must then
        # not be left "pending" with nothing in the socket) and before this turn runs the
        # commands: a command posted from here on sends a new byte, earlier ones run now.
        self._wake_pending = False

    def _register_listener(self, entry: SocketEntry) -> None:
        if entry._closed:
            return
        self._sel.register(entry._listener, selectors.EVENT_READ, _Listener(entry))

    def _drop_entry(self, entry: SocketEntry) -> None:
        for conn in list(entry._conns):
            self._close(conn)
        with contextlib.suppress(KeyError, ValueError, OSError):
            self._sel.unregister(entry._listener)
        entry._listener.close()
        root, entry._root = entry._root, None
        if root is not None:
            root.close()

    def _count(self, entry: SocketEntry, name: str) -> None:
        setattr(entry.counters, name, getattr(entry.counters, name) + 1)
        setattr(self._totals, name, getattr(self._totals, name) + 1)

    # -- connections ----------------------------------------------------------------------------

    def _accept(self, entry: SocketEntry) -> None:
        for _ in range(_ACCEPTS_PER_EVENT):
            try:
                sock, _ = entry._listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.warning(
                        "credential socket %s: cannot accept (%s); pausing %.1f s",
                        entry.sandbox_id,
                        exc.strerror,
                        _ACCEPT_PAUSE,
                    )
                    self._pause_listener(entry)
                return
            sock.setblocking(False)
            if len(entry._conns) >= self.max_connections:
                self._count(entry, "over_capacity")
                self._warn(
                    entry,
                    "over_capacity",
                    f"refused a connection: already {len(entry._conns)} open",
                )
                sock.close()
                continue
            conn = _Conn(sock, entry)
            entry._conns.add(conn)
            self._count(entry, "accepted")
            self._set_deadline(conn)
            self._authenticate(conn)

    def _pause_listener(self, entry: SocketEntry) -> None:
        with contextlib.suppress(KeyError, ValueError, OSError):
            self._sel.unregister(entry._listener)

        def resume() -> None:
            if not entry._closed and entry._listener.fileno() >= 0:
                with contextlib.suppress(KeyError, ValueError, OSError):
                    self._register_listener(entry)

        self._call_at(time.monotonic() + _ACCEPT_PAUSE, resume)

    def _set_deadline(self, conn: _Conn) -> None:
        seq = -1

        def expire() -> None:
            if conn.phase is not _Phase.CLOSED and conn.deadline_seq == seq:
                self._timed_out(conn)

        seq = self._call_at(time.monotonic() + self.idle_timeout, expire)
        conn.deadline_seq = seq

    def _clear_deadline(self, conn: _Conn) -> None:
        conn.deadline_seq = -1

    def _timed_out(self, conn: _Conn) -> None:
        entry = conn.entry
        self._count(entry, "timeouts")
        what = {
            _Phase.PARKED: "waited for the sandbox to be bound",
            _Phase.READ: "sent no complete request",
            _Phase.WRITE: "did not read its reply",
        }.get(conn.phase, "made no progress")
        self._warn(
            entry, "timeouts", f"dropped a connection that {what} for {self.idle_timeout:g} s"
        )
        self._close(conn)

    def _recheck_parked(self, entry: SocketEntry) -> None:
        for conn in list(entry._conns):
            if conn.phase is _Phase.PARKED:
                self._authenticate(conn)

    def _authenticate(self, conn: _Conn) -> None:
        """Peer-check a connection, or park it until a process is bound."""
        entry = conn.entry
        with entry._lock:
            state, root, uid = entry._state, entry._root, entry._uid
        if state is SandboxState.WAITING:
            conn.phase = _Phase.PARKED
            return
        try:
            if root is None or uid is None:
                raise PeerRejected("no sandbox process was ever bound to this socket")
            cred = check_peer(conn.sock, uid=uid, root=root, accepted_ticks=conn.accepted_ticks)
        except PeerRejected as exc:
            self._reject(conn, str(exc))
            return
        except OSError as exc:
            self._reject(conn, f"cannot check the peer: {exc.strerror or exc}")
            return
        conn.peer_pid = cred.pid
        conn.phase = _Phase.READ
        self._set_deadline(conn)  # a parked connection gets its full time for the request
        self._set_events(conn, selectors.EVENT_READ)

    def _on_event(self, conn: _Conn, mask: int) -> None:
        if conn.phase is _Phase.READ and mask & selectors.EVENT_READ:
            self._read(conn)
        elif conn.phase is _Phase.WRITE and mask & selectors.EVENT_WRITE:
            self._flush(conn)

    def _read(self, conn: _Conn) -> None:
        for _ in range(_READS_PER_EVENT):
            if conn.phase is not _Phase.READ:
                return
            if conn.payload is None:
                want = _HEADER.size - len(conn.header)
            else:
                want = conn.length - len(conn.payload)
            try:
                data = conn.sock.recv(min(want, _RECV_CHUNK))
            except BlockingIOError:
                return
            except ConnectionResetError:
                data = b""
            if not data:
                self._eof(conn)
                return
            if not conn.header and conn.deadline_seq < 0:
                self._set_deadline(conn)  # a frame has started: it must finish in time
            if conn.payload is None:
                conn.header += data
                if len(conn.header) < _HEADER.size:
                    continue
                (length,) = _HEADER.unpack(conn.header)
                if length > MAX_FRAME:
                    self._violation(
                        conn,
                        f"oversized frame: header announces {length} bytes, "
                        f"over the {MAX_FRAME}-byte limit",
                    )
                    return
                if length == 0:
                    self._violation(conn, "empty frame")
                    return
                conn.length = length
                conn.payload = bytearray()
            else:
                conn.payload += data
                if len(conn.payload) == conn.length:
                    payload = conn.payload
                    conn.header.clear()
                    conn.payload = None
                    conn.length = 0
                    self._clear_deadline(conn)
                    self._handle_frame(conn, payload)

    def _eof(self, conn: _Conn) -> None:
        if conn.header or conn.payload is not None:
            got = len(conn.header) if conn.payload is None else _HEADER.size + len(conn.payload)
            total = _HEADER.size if conn.payload is None else _HEADER.size + conn.length
            self._violation(conn, f"truncated frame: closed after {got} of {total} bytes")
            return
        log.debug("credential socket %s: peer %d closed", conn.entry.sandbox_id, conn.peer_pid)
        self._close(conn)

    def _handle_frame(self, conn: _Conn, payload: bytearray) -> None:
        entry = conn.entry
        try:
            request = parse_request(decode_payload(payload))
        except ProtocolError as exc:
            self._violation(conn, f"malformed request: {exc}")
            return
        state, token, expires_at = entry._snapshot()
        rule = ALLOWED[state].get(type(request))
        if rule is None:
            self._violation(conn, f"{request.type!r} request not allowed while {state.value}")
            return
        if rule.action is Action.REFUSE_ENDED:
            self._refuse(conn, "the work item has ended; there is no token")
        elif rule.action is Action.HAND_OUT:
            if token is None:
                self._refuse(conn, "no token has been issued for this work item")
            elif expires_at <= time.time():
                self._refuse(conn, "the work item's token expired and was not refreshed")
            else:
                self._count(entry, "tokens_served")
                self._reply(conn, TokenReply(token=token.reveal(), expires_at=expires_at))
        elif rule.action is Action.PROXY:
            assert isinstance(request, ProxyRequest)  # noqa: S101 - the table maps the type
            self._proxy(conn, request, token)

    def _proxy(self, conn: _Conn, request: ProxyRequest, token: _Secret | None) -> None:
        # parse_request has checked both; checked again here because this is where it counts.
        try:
            if request.method not in METHODS:
                raise ProtocolError(f"proxy method {request.method[:20]!r} is not allowed")
            check_proxy_path(request.method, request.path)
        except ProtocolError as exc:
            self._violation(conn, f"proxy refused: {exc}")
            return
        if self._proxy_handler is None:
            self._reply(
                conn,
                ErrorReply(code="proxy_unavailable", message="this supervisor does not proxy"),
            )
            return
        if token is None:
            self._refuse(conn, "no token has been issued for this work item")
            return
        conn.phase = _Phase.BUSY
        self._set_events(conn, 0)
        future = self._proxy_pool.submit(
            self._call_proxy, conn.entry.sandbox_id, request, token, self._proxy_handler
        )
        future.add_done_callback(lambda f: self._post(lambda: self._proxy_done(conn, f)))

    @staticmethod
    def _call_proxy(
        sandbox_id: str, request: ProxyRequest, token: _Secret, handler: ProxyHandler
    ) -> ToSandbox:
        """Runs on a pool thread: one API call, turned into the reply for the child."""
        what = f"{request.method} {request.path}"
        try:
            status, body = handler(
                sandbox_id, request.method, request.path, request.body, token.reveal()
            )
        except OSError as exc:  # includes every requests exception
            log.warning(
                "credential socket %s: proxy %s: API unreachable: %s",
                sandbox_id,
                what,
                token.scrub(f"{type(exc).__name__}: {exc}"),
            )
            return ErrorReply(
                code=SERVER_UNAVAILABLE, message=f"{what}: the supervisor could not reach the API"
            )
        except Exception as exc:
            log.error(
                "credential socket %s: proxy %s failed: %s",
                sandbox_id,
                what,
                token.scrub(f"{type(exc).__name__}: {exc}"),
            )
            return ErrorReply(code="proxy_failed", message=f"{what}: the supervisor failed")
        try:
            reply = ProxyResponse(status=status, body=body)
            encode_frame(reply.to_wire())
        except ProtocolError as exc:  # FrameTooLarge included
            log.warning(
                "credential socket %s: proxy %s: cannot relay the response: %s",
                sandbox_id,
                what,
                token.scrub(str(exc)),
            )
            return ErrorReply(
                code="bad_response", message=f"{what}: the response cannot be relayed"
            )
        return reply

    def _proxy_done(self, conn: _Conn, future: Future[ToSandbox]) -> None:
        if conn.phase is not _Phase.BUSY:
            return  # closed meanwhile
        if future.cancelled():
            self._close(conn)
            return
        reply = future.result()
        entry = conn.entry
        if isinstance(reply, ErrorReply) and reply.code == SERVER_UNAVAILABLE:
            self._count(entry, "proxy_unavailable")
        else:
            self._count(entry, "proxied")
        self._reply(conn, reply)

    def _refuse(self, conn: _Conn, message: str) -> None:
        self._count(conn.entry, "refusals")
        self._reply(conn, ErrorReply(code=NO_TOKEN, message=message))

    def _reply(self, conn: _Conn, reply: ToSandbox) -> None:
        frame = encode_frame(reply.to_wire())
        conn.out = memoryview(frame)
        conn.phase = _Phase.WRITE
        self._set_deadline(conn)
        self._flush(conn)

    def _flush(self, conn: _Conn) -> None:
        out = conn.out
        while out is not None and len(out):
            try:
                n = conn.sock.send(out)
            except BlockingIOError:
                conn.out = out
                self._set_events(conn, selectors.EVENT_WRITE)
                return
            except OSError:  # EPIPE, ECONNRESET: the peer left
                self._close(conn)
                return
            out = out[n:]
        conn.out = None
        conn.phase = _Phase.READ
        self._clear_deadline(conn)
        self._set_events(conn, selectors.EVENT_READ)

    def _set_events(self, conn: _Conn, events: int) -> None:
        if events == conn.events:
            return
        if conn.events == 0:
            self._sel.register(conn.sock, events, conn)
        elif events == 0:
            self._sel.unregister(conn.sock)
        else:
            self._sel.modify(conn.sock, events, conn)
        conn.events = events

    def _reject(self, conn: _Conn, reason: str) -> None:
        self._count(conn.entry, "peer_rejected")
        self._warn(conn.entry, "peer_rejected", f"refused a connection: {reason}")
        self._close(conn)

    def _warn(self, entry: SocketEntry, kind: str, message: str) -> None:
        """Log a warning about ``entry``, at most one per ``kind`` per second: a process
        that connects in a loop must not flood the supervisor's log (the counters still
        count every one)."""
        now = time.monotonic()
        last, quiet = entry._warned.get(kind, (0.0, 0))
        if now - last < _WARN_INTERVAL:
            entry._warned[kind] = (last, quiet + 1)
            return
        entry._warned[kind] = (now, 0)
        more = f" ({quiet} more like it not logged)" if quiet else ""
        log.warning("credential socket %s: %s%s", entry.sandbox_id, message, more)

    def _violation(self, conn: _Conn, reason: str) -> None:
        """OpenSSH's ``fatal("unpermitted request")``: the sandbox is hostile from here on.
        Its token is dropped and every connection of it closed at once, not only when the
        supervisor's kill lands; the entry stays ENDED."""
        entry = conn.entry
        self._count(entry, "violations")
        log.warning(
            "credential socket %s: protocol violation by pid %d: %s; closing its connections "
            "and withdrawing its token",
            entry.sandbox_id,
            conn.peer_pid,
            reason,
        )
        with entry._lock:
            entry._state = SandboxState.ENDED
            entry._token = None
        for other in list(entry._conns):
            self._close(other)
        self._close(conn)
        if self._on_violation is not None:
            with contextlib.suppress(RuntimeError):  # pool shut down: we are closing
                self._notify_pool.submit(self._notify_violation, entry.sandbox_id, reason)

    def _notify_violation(self, sandbox_id: str, reason: str) -> None:
        assert self._on_violation is not None  # noqa: S101
        try:
            self._on_violation(sandbox_id, reason)
        except Exception:
            log.error("credential socket %s: on_violation failed", sandbox_id, exc_info=True)

    def _close(self, conn: _Conn) -> None:
        if conn.phase is _Phase.CLOSED:
            return
        conn.phase = _Phase.CLOSED
        if conn.events:
            with contextlib.suppress(KeyError, ValueError, OSError):
                self._sel.unregister(conn.sock)
            conn.events = 0
        conn.sock.close()
        conn.entry._conns.discard(conn)
        conn.out = None
        conn.payload = None
        conn.deadline_seq = -1


__all__ = [
    "ALLOWED",
    "NO_TOKEN",
    "SOCKET_NAME",
    "Action",
    "Counters",
    "CredentialServer",
    "ProxyHandler",
    "Rule",
    "SandboxState",
    "SocketEntry",
    "ViolationHandler",
]
