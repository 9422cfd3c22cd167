"""The loop-thread half of the credential server: every connection, from accept to close.

Everything here runs on the reactor thread and owns the sockets it touches; the other threads
reach it only through :meth:`~privsep.sandbox._reactor.Reactor.call_soon`. It is the code that
enforces the protections the :mod:`~privsep.runner.supervisor.credsock` module doc lists, in
that order, for each connection: capacity, the peer check before a byte is read, bounded
framing, and the state table (:mod:`~privsep.runner.supervisor.credtable`), with a violation
withdrawing the token and reporting the sandbox to be killed.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import logging
import selectors
import socket
import struct
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from privsep._token import Token
from privsep.client._exceptions import ProtocolError
from privsep.client._wire import (
    MAX_FRAME,
    SERVER_UNAVAILABLE,
    ErrorReply,
    ProxyRequest,
    TokenReply,
    ToSandbox,
    decode_payload,
    encode_frame,
    parse_request,
)
from privsep.runner.supervisor.credentry import SocketEntry
from privsep.runner.supervisor.credproxy import ProxyHandler, call_proxy, check_proxy_request
from privsep.runner.supervisor.credtable import ALLOWED, NO_TOKEN, Action, Counters, SandboxState
from privsep.runner.supervisor.peercheck import PeerRejected, boottime_ticks, check_peer
from privsep.sandbox._reactor import Reactor, Timer

log = logging.getLogger("privsep.supervisor.credsock")

ViolationHandler = Callable[[str, str], None]
"""``on_violation(sandbox_id, reason)``: the sandbox broke the protocol; the supervisor kills
it. Called on a thread of its own (never the selector thread), once per violation."""

_HEADER = struct.Struct(">I")
_RECV_CHUNK = 65536
_READS_PER_EVENT = 8  # then let other sockets have a turn
_ACCEPTS_PER_EVENT = 32
_ACCEPT_PAUSE = 0.5  # after EMFILE/ENFILE: stop accepting on that socket for a moment
_WARN_INTERVAL = 1.0  # per socket and kind of event


class _Phase(enum.Enum):
    PARKED = "parked"  # accepted while WAITING: not checked, not read
    READ = "read"  # checked; reading a frame
    BUSY = "busy"  # a proxied call is in flight; not reading
    WRITE = "write"  # sending a reply; not reading
    CLOSED = "closed"


class Conn:
    """One accepted connection. Owned by the loop thread."""

    __slots__ = (
        "accepted_ticks",
        "deadline",
        "entry",
        "events",
        "header",
        "length",
        "on_ready",
        "out",
        "payload",
        "peer_pid",
        "phase",
        "sock",
    )

    def __init__(
        self, sock: socket.socket, entry: SocketEntry, on_ready: Callable[[Conn], None]
    ) -> None:
        self.sock = sock
        # What the reactor calls when the socket is ready; made once, not per registration.
        self.on_ready: Callable[[int], None] = lambda _fd: on_ready(self)
        self.entry = entry
        self.phase = _Phase.PARKED
        self.events = 0
        self.header = bytearray()
        self.length = 0
        self.payload: bytearray | None = None
        self.out: memoryview | None = None
        self.deadline: Timer | None = None
        self.accepted_ticks = boottime_ticks()
        self.peer_pid = 0


@dataclass(frozen=True)
class Options:
    """How the connections are served (see :class:`~privsep.runner.supervisor.credsock.
    CredentialServer` for each)."""

    proxy_handler: ProxyHandler | None
    on_violation: ViolationHandler | None
    idle_timeout: float
    max_connections: int
    proxy_workers: int


class Connections:
    """Serves the connections of every credential socket on one reactor (loop thread only,
    but for :meth:`shutdown`)."""

    def __init__(self, reactor: Reactor, options: Options) -> None:
        self._reactor = reactor
        self._opts = options
        self.totals = Counters()
        self._proxy_pool = ThreadPoolExecutor(
            max_workers=options.proxy_workers, thread_name_prefix="privsep-credsock-proxy"
        )
        self._notify_pool = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="privsep-credsock-notify"
        )

    def shutdown(self) -> None:
        """Abandon in-flight proxied calls (their replies are dropped); any thread."""
        self._proxy_pool.shutdown(wait=False, cancel_futures=True)
        self._notify_pool.shutdown(wait=False)

    def listen(self, entry: SocketEntry) -> None:
        """Start accepting on ``entry``'s socket."""
        if entry._closed:
            return
        self._reactor.add_reader(entry._listener.fileno(), lambda _fd: self._accept(entry))

    def drop(self, entry: SocketEntry) -> None:
        """Close ``entry``'s connections and socket, and let go of its process record."""
        for conn in list(entry._conns):
            self._close(conn)
        if entry._listener.fileno() >= 0:
            self._reactor.remove_reader(entry._listener.fileno())
        entry._listener.close()
        root, entry._root = entry._root, None
        if root is not None:
            root.close()

    def _count(self, entry: SocketEntry, name: str) -> None:
        setattr(entry.counters, name, getattr(entry.counters, name) + 1)
        setattr(self.totals, name, getattr(self.totals, name) + 1)

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
            if len(entry._conns) >= self._opts.max_connections:
                self._count(entry, "over_capacity")
                self._warn(
                    entry,
                    "over_capacity",
                    f"refused a connection: already {len(entry._conns)} open",
                )
                sock.close()
                continue
            conn = Conn(sock, entry, self._on_ready)
            entry._conns.add(conn)
            self._count(entry, "accepted")
            self._set_deadline(conn)
            self._authenticate(conn)

    def _pause_listener(self, entry: SocketEntry) -> None:
        self._reactor.remove_reader(entry._listener.fileno())

        def resume() -> None:
            if not entry._closed and entry._listener.fileno() >= 0:
                with contextlib.suppress(KeyError, ValueError, OSError):
                    self.listen(entry)

        self._reactor.call_later(_ACCEPT_PAUSE, resume)

    def _set_deadline(self, conn: Conn) -> None:
        self._clear_deadline(conn)

        def expire() -> None:
            if conn.phase is not _Phase.CLOSED:
                self._timed_out(conn)

        conn.deadline = self._reactor.call_later(self._opts.idle_timeout, expire)

    def _clear_deadline(self, conn: Conn) -> None:
        if conn.deadline is not None:
            conn.deadline.cancel()
            conn.deadline = None

    def _timed_out(self, conn: Conn) -> None:
        entry = conn.entry
        self._count(entry, "timeouts")
        what = {
            _Phase.PARKED: "waited for the sandbox to be bound",
            _Phase.READ: "sent no complete request",
            _Phase.WRITE: "did not read its reply",
        }.get(conn.phase, "made no progress")
        self._warn(
            entry, "timeouts", f"dropped a connection that {what} for {self._opts.idle_timeout:g} s"
        )
        self._close(conn)

    def recheck_parked(self, entry: SocketEntry) -> None:
        """Peer-check the connections that waited for ``entry`` to be bound (loop thread)."""
        for conn in list(entry._conns):
            if conn.phase is _Phase.PARKED:
                self._authenticate(conn)

    def _authenticate(self, conn: Conn) -> None:
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

    def _on_ready(self, conn: Conn) -> None:
        # A connection is watched only for what its phase waits on, so the phase says which.
        try:
            if conn.phase is _Phase.READ:
                self._read(conn)
            elif conn.phase is _Phase.WRITE:
                self._flush(conn)
        except Exception:
            log.error("credential server: error handling an event", exc_info=True)
            self._close(conn)

    def _read(self, conn: Conn) -> None:
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
            if not conn.header and conn.deadline is None:
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

    def _eof(self, conn: Conn) -> None:
        if conn.header or conn.payload is not None:
            got = len(conn.header) if conn.payload is None else _HEADER.size + len(conn.payload)
            total = _HEADER.size if conn.payload is None else _HEADER.size + conn.length
            self._violation(conn, f"truncated frame: closed after {got} of {total} bytes")
            return
        log.debug("credential socket %s: peer %d closed", conn.entry.sandbox_id, conn.peer_pid)
        self._close(conn)

    def _handle_frame(self, conn: Conn, payload: bytearray) -> None:
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

    def _proxy(self, conn: Conn, request: ProxyRequest, token: Token | None) -> None:
        try:
            check_proxy_request(request)
        except ProtocolError as exc:
            self._violation(conn, f"proxy refused: {exc}")
            return
        if self._opts.proxy_handler is None:
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
            call_proxy, conn.entry.sandbox_id, request, token, self._opts.proxy_handler
        )
        future.add_done_callback(lambda f: self._post(lambda: self._proxy_done(conn, f)))

    def _post(self, fn: Callable[[], None]) -> None:
        with contextlib.suppress(RuntimeError):  # the reactor stopped: nobody waits for it
            self._reactor.call_soon(fn)

    def _proxy_done(self, conn: Conn, future: Future[ToSandbox]) -> None:
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

    def _refuse(self, conn: Conn, message: str) -> None:
        self._count(conn.entry, "refusals")
        self._reply(conn, ErrorReply(code=NO_TOKEN, message=message))

    def _reply(self, conn: Conn, reply: ToSandbox) -> None:
        frame = encode_frame(reply.to_wire())
        conn.out = memoryview(frame)
        conn.phase = _Phase.WRITE
        self._set_deadline(conn)
        self._flush(conn)

    def _flush(self, conn: Conn) -> None:
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

    def _set_events(self, conn: Conn, events: int) -> None:
        if events == conn.events:
            return
        self._reactor.watch(conn.sock.fileno(), events, conn.on_ready)
        conn.events = events

    def _reject(self, conn: Conn, reason: str) -> None:
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

    def _violation(self, conn: Conn, reason: str) -> None:
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
        if self._opts.on_violation is not None:
            with contextlib.suppress(RuntimeError):  # pool shut down: we are closing
                self._notify_pool.submit(self._notify_violation, entry.sandbox_id, reason)

    def _notify_violation(self, sandbox_id: str, reason: str) -> None:
        assert self._opts.on_violation is not None  # noqa: S101
        try:
            self._opts.on_violation(sandbox_id, reason)
        except Exception:
            log.error("credential socket %s: on_violation failed", sandbox_id, exc_info=True)

    def _close(self, conn: Conn) -> None:
        if conn.phase is _Phase.CLOSED:
            return
        conn.phase = _Phase.CLOSED
        if conn.events:
            self._reactor.remove_reader(conn.sock.fileno())
            conn.events = 0
        conn.sock.close()
        conn.entry._conns.discard(conn)
        conn.out = None
        conn.payload = None
        self._clear_deadline(conn)


__all__ = ["Conn", "Connections", "Options", "ViolationHandler"]
