"""How a :class:`~privsep.client.Client` reaches the API: the credential socket, the token it
hands out, and the transports (socket proxy, direct HTTP, or a test's handler).

A transport answers ``request(method, path, body, timeout=...)`` with ``(status, json_body)``
and raises :class:`ServerUnavailable` or :class:`ConnectionLost` when it could not get an
answer. Mapping statuses to exceptions, and retrying, happen one layer up, in the client, so
every transport behaves the same.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from privsep._token import Token
from privsep.client._exceptions import (
    ConnectionLost,
    ProtocolError,
    Refused,
    ServerUnavailable,
)
from privsep.client._wire import (
    SERVER_UNAVAILABLE,
    ErrorReply,
    ProxyRequest,
    ProxyResponse,
    TokenReply,
    TokenRequest,
    ToSandbox,
    ToSupervisor,
    encode_frame,
    parse_reply,
    recv_frame,
)

REFRESH_AT = 0.8
"""Ask the supervisor again once this fraction of a token's remaining lifetime has passed."""


class Transport(Protocol):
    """What a client needs to make one API call. Implement it to run a client without a
    supervisor (see :class:`MockTransport`)."""

    def request(self, method: str, path: str, body: Any, *, timeout: float) -> tuple[int, Any]: ...

    def close(self) -> None: ...


Handler = Callable[[str, str, Any], tuple[int, Any]]


class MockTransport:
    """A transport that calls ``handler(method, path, body) -> (status, body)`` in-process.

    For unit tests of code that uses the client (status mapping, retries, ergonomics); the
    handler may raise :class:`ServerUnavailable` or :class:`ConnectionLost` to simulate an
    unreachable API.
    """

    def __init__(self, handler: Handler) -> None:
        self._handler = handler

    def request(self, method: str, path: str, body: Any, *, timeout: float) -> tuple[int, Any]:
        return self._handler(method, path, body)

    def close(self) -> None:
        pass


class SocketChannel:
    """One connection to the credential socket, shared by every call of one client.

    The protocol is strictly request then reply, so the lock spans the whole exchange. After a
    broken exchange (EOF, timeout, malformed reply) the connection is dropped: the next call
    connects again rather than reading a stale reply.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()

    def exchange(self, request: ToSupervisor, *, expect: str, timeout: float) -> ToSandbox:
        frame = encode_frame(request.to_wire())  # too large: refused before anything is sent
        with self._lock:
            sock = self._connect(timeout)
            try:
                sock.settimeout(timeout)
                sock.sendall(frame)
                return parse_reply(recv_frame(sock), expect=expect)
            except TimeoutError:
                self._drop()
                raise ServerUnavailable(
                    f"the supervisor did not answer a {request.type!r} request on "
                    f"{self.path} within {timeout:g} s"
                ) from None
            except (ProtocolError, ConnectionLost):
                self._drop()
                raise
            except OSError as exc:
                self._drop()
                raise ConnectionLost(
                    f"credential socket {self.path} failed during a {request.type!r} "
                    f"request: {exc.strerror or exc}"
                ) from None

    def _connect(self, timeout: float) -> socket.socket:
        if self._sock is not None:
            return self._sock
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(self.path)
        except OSError as exc:
            sock.close()
            raise ConnectionLost(
                f"cannot connect to the credential socket {self.path}: {exc.strerror or exc}"
            ) from None
        self._sock = sock
        return sock

    def _drop(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def close(self) -> None:
        with self._lock:
            self._drop()


def _refusal(reply: ErrorReply, what: str) -> Exception:
    if reply.code == SERVER_UNAVAILABLE:
        return ServerUnavailable(f"{what}: the supervisor could not reach the API: {reply.message}")
    return Refused(f"{what}: the supervisor refused: {reply.message}", code=reply.code)


class TokenSource:
    """The work item's token, fetched from the supervisor and asked for again once about 80%
    of its remaining lifetime has passed (the supervisor refreshes it with the server)."""

    def __init__(self, channel: SocketChannel, *, timeout: float) -> None:
        self._channel = channel
        self._timeout = timeout
        self._token: Token | None = None
        self._refresh_at = 0.0
        self._lock = threading.Lock()

    def get(self, *, force: bool = False) -> Token:
        with self._lock:
            now = time.time()
            if self._token is None or force or now >= self._refresh_at:
                reply = self._channel.exchange(
                    TokenRequest(), expect="token", timeout=self._timeout
                )
                if isinstance(reply, ErrorReply):
                    raise _refusal(reply, "fetching the API token")
                assert isinstance(reply, TokenReply)  # noqa: S101 - parse_reply checked it
                self._token = Token(reply.token, reply.expires_at)
                self._refresh_at = now + REFRESH_AT * max(0.0, reply.expires_at - now)
            return self._token

    def __repr__(self) -> str:
        return f"TokenSource(socket={self._channel.path!r}, token={self._token!r})"


class ProxyTransport:
    """Every call goes through the supervisor (``proxy`` messages); the child never holds a
    token. For sandboxes whose network policy is ``none``."""

    def __init__(self, channel: SocketChannel) -> None:
        self._channel = channel

    def request(self, method: str, path: str, body: Any, *, timeout: float) -> tuple[int, Any]:
        # The supervisor makes the call with its own timeout; leave it room to answer.
        request = ProxyRequest(method=method, path=path, body=body)
        reply = self._channel.exchange(request, expect="proxy_response", timeout=timeout + 5.0)
        if isinstance(reply, ErrorReply):
            raise _refusal(reply, f"{method} {path}")
        assert isinstance(reply, ProxyResponse)  # noqa: S101 - parse_reply checked it
        return reply.status, reply.body

    def close(self) -> None:
        self._channel.close()

    def __repr__(self) -> str:
        return f"ProxyTransport(socket={self._channel.path!r})"
