"""A small JSON-over-HTTP/1.1 client for the supervisor's hot paths.

Every work item costs the supervisor several API calls (the claim, the sandbox's proxied calls,
sometimes an outcome). Through ``requests`` each one paid for a session's machinery: request
preparation, hooks, cookie jars, adapter and pool look-ups, ``urllib3``'s response wrapper. The
end-to-end profile put most of the supervisor's CPU there. This client keeps one plain
``http.client`` connection per thread, alive between calls, and does only what the internal API
needs: a JSON body in, a status and a decoded JSON body out.

It reads no proxy, netrc or CA settings from the environment on its own (``requests`` did for
the supervisor's own session): the server URL in the configuration is the one it talks to.
HTTPS verifies against ``certifi``'s bundle, as ``requests`` did, when it is installed.

A kept connection the server has closed meanwhile (its keep-alive timeout) is noticed before it
is reused, as ``urllib3`` does, so no request is sent on a dead connection and no request is
ever sent twice: a POST that fails after it was sent is reported, never retried here.
"""

from __future__ import annotations

import http.client
import json
import select
import socket
import ssl
import threading
import weakref
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from privsep.client._unixhttp import UnixHTTPConnection

__all__ = ["HttpReply", "HttpUnavailable", "KeepAliveClient"]


class HttpUnavailable(ConnectionError):
    """No answer: the connection could not be made, broke, timed out, or the reply was not
    HTTP. A subclass of :class:`OSError`, which is what the credential socket's proxy contract
    takes for "the API could not be reached".

    ``request`` names what was sent (``"GET /v1/x"``), ``reason`` is the OS's reason when there
    is one (``"Connection refused"``), and ``timed_out`` tells a silent server from a refusal,
    so that a command can say which it was. ``sent`` is False when the request never fully
    left (no connection, or writing it failed): the server cannot have acted on it, so it may
    go to another replica whatever its method.
    """

    def __init__(
        self,
        message: str,
        *,
        request: str = "",
        reason: str = "",
        timed_out: bool = False,
        sent: bool = True,
    ) -> None:
        super().__init__(message)
        self.request = request
        self.reason = reason or message
        self.timed_out = timed_out
        self.sent = sent


@dataclass(frozen=True)
class HttpReply:
    """One answer. ``data`` is the decoded JSON body, ``None`` if empty or not JSON; ``text``
    is the start of the raw body, for error messages; ``retry_after`` the seconds of a
    ``Retry-After`` header (a 503 during a database outage), ``None`` without one."""

    status: int
    data: Any
    text: str
    retry_after: float | None = None


def retry_after_of(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header in its delay form; ``None`` when absent or in the
    date form (which the server never sends), and at most an hour, whatever it says."""
    if value is None or not value.strip().isdigit():
        return None
    return min(float(value.strip()), 3600.0)


class _Connection(http.client.HTTPConnection):
    def connect(self) -> None:
        super().connect()
        # One send() per request already (headers and body go out together); no Nagle delay
        # on the odd split write either, as urllib3 does.
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _TlsConnection(http.client.HTTPSConnection):
    def connect(self) -> None:
        super().connect()
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _tls_context() -> ssl.SSLContext:
    try:
        import certifi
    except ImportError:  # the system's store, then
        return ssl.create_default_context()
    return ssl.create_default_context(cafile=certifi.where())


def _dropped(conn: http.client.HTTPConnection) -> bool:
    """True if a kept connection can no longer be used: it was closed, or the server sent
    something (its FIN, usually) while no request was outstanding."""
    sock = conn.sock
    if sock is None:
        return False  # not connected yet: http.client connects on the next request
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(readable)


class KeepAliveClient:
    """Calls one HTTP(S) server with JSON bodies over one kept connection per thread.

    Thread-safe: each thread that calls :meth:`request` gets a connection of its own, so the
    supervisor's loop and the credential socket's proxy pool never wait on each other.
    """

    def __init__(
        self, base_url: str, *, timeout: float = 10.0, unix_socket: str | None = None
    ) -> None:
        """``unix_socket``: connect there instead of to the URL's host and port (a server on
        the same host; loopback TCP costs both sides more CPU per call)."""
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"server URL {base_url!r} must be http:// or https://HOST[:PORT]")
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self._tls = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port or (443 if self._tls else 80)
        self._prefix = parts.path.rstrip("/")
        self._context = _tls_context() if self._tls else None
        self._unix_socket = unix_socket or None
        if self._unix_socket and self._tls:
            raise ValueError("a unix socket to the API is plain HTTP: use an http:// URL with it")
        self._local = threading.local()
        self._all: weakref.WeakSet[http.client.HTTPConnection] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._closed = False

    def __repr__(self) -> str:
        via = f", unix_socket={self._unix_socket!r}" if self._unix_socket else ""
        return f"KeepAliveClient({self.base_url!r}{via})"

    def _connection(self) -> http.client.HTTPConnection:
        if self._closed:
            raise HttpUnavailable(f"the client for {self.base_url} is closed", sent=False)
        conn: http.client.HTTPConnection | None = getattr(self._local, "conn", None)
        if conn is not None and _dropped(conn):
            conn.close()  # http.client reconnects on the next request
        if conn is None:
            with self._lock:
                if self._closed:
                    raise HttpUnavailable(f"the client for {self.base_url} is closed", sent=False)
                if self._unix_socket:
                    conn = UnixHTTPConnection(
                        self._unix_socket, self._host, self._port, timeout=self.timeout
                    )
                elif self._tls:
                    conn = _TlsConnection(
                        self._host, self._port, timeout=self.timeout, context=self._context
                    )
                else:
                    conn = _Connection(self._host, self._port, timeout=self.timeout)
                self._all.add(conn)
            self._local.conn = conn
        return conn

    def request(
        self, method: str, path: str, body: Any = None, *, token: str | None = None
    ) -> HttpReply:
        """Send one request (``body`` as JSON unless ``None``) and read the whole answer.
        Raises :class:`HttpUnavailable` when there is no answer; any status is an answer."""
        headers = {"Accept": "application/json"}
        data: bytes | None = None
        if body is not None:
            data = json.dumps(body, separators=(",", ":"), allow_nan=False).encode()
            headers["Content-Type"] = "application/json"
        elif method in ("POST", "PUT", "PATCH"):
            headers["Content-Length"] = "0"
        if token:
            headers["Authorization"] = f"Bearer {token}"
        conn = self._connection()
        sent = False
        try:
            conn.request(method, self._prefix + path, body=data, headers=headers)
            sent = True
            resp = conn.getresponse()
            raw = resp.read()
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            raise HttpUnavailable(
                f"{type(exc).__name__} talking to {self.base_url}",
                request=f"{method} {path}",
                reason=getattr(exc, "strerror", None) or type(exc).__name__,
                timed_out=isinstance(exc, TimeoutError),
                sent=sent,
            ) from None
        if resp.will_close:
            conn.close()
        try:
            decoded = json.loads(raw) if raw else None
        except ValueError:
            decoded = None
        text = raw[:200].decode("utf-8", "replace") if decoded is None else ""
        return HttpReply(resp.status, decoded, text, retry_after_of(resp.getheader("Retry-After")))

    def close(self) -> None:
        """Close every thread's connection; later requests raise :class:`HttpUnavailable`."""
        with self._lock:
            self._closed = True
            conns = list(self._all)
        for conn in conns:
            conn.close()
