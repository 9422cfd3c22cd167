"""The credential-socket protocol, spoken by a sandboxed child and its supervisor.

Both sides import this module (the supervisor as ``privsep.client._wire``), so the framing and
the message schema exist exactly once. It uses only the standard library.

Transport
    One connected ``AF_UNIX`` ``SOCK_STREAM`` socket, whose path the child finds in the
    environment variable ``PRIVSEP_CREDENTIAL_SOCKET``. The supervisor checks the peer
    (``SO_PEERCRED``) before it answers anything.

Framing
    A frame is a 4-byte unsigned big-endian length ``N`` followed by ``N`` bytes of UTF-8 JSON
    that decode to an object with a string member ``"type"``. ``1 <= N <= MAX_FRAME`` (1 MiB).
    A reader checks ``N`` *before* it allocates or reads the payload (:class:`FrameTooLarge`);
    EOF anywhere before a frame is complete is :class:`ConnectionLost` (a short read is EOF,
    never a partial message); invalid UTF-8, invalid JSON, a non-object, a duplicate key,
    ``NaN``/``Infinity`` or a missing ``"type"`` is :class:`ProtocolError`. After any of these
    the connection is unusable and is closed.

Conversation
    Strictly one request, then one reply, in order; the child only asks, the supervisor only
    answers. Every message is closed: a member that is not listed below is an error, as is an
    unknown ``"type"``.

Child → supervisor (:data:`ToSupervisor`, validated by :func:`parse_request`)
    ``{"type": "token"}``
        Ask for the current short-lived API token of this sandbox's work item.
    ``{"type": "proxy", "method": M, "path": P, "body": B}``
        Forward one API call, for a child whose network policy is ``none``. ``M`` is ``GET``,
        ``POST``, ``PUT`` or ``DELETE``; ``P`` is an absolute path under ``/v1/task/``,
        ``/v1/parse/`` or ``/v1/trigger/`` made of unreserved characters and ``%XX`` escapes,
        with no query, no fragment, no empty, ``.`` or ``..`` segment (also when
        percent-decoded), and ``M P`` must be a call on a ``PROXY`` row of the sandbox surface
        (:mod:`privsep.client._surface`); ``B`` is the JSON request body, or ``null`` for none.

Supervisor → child (:data:`ToSandbox`, validated by :func:`parse_reply`)
    ``{"type": "token", "token": T, "expires_at": E}``
        Reply to ``token``: ``T`` is the bearer token, ``E`` its expiry in Unix seconds. The
        child asks again once about 80% of the remaining lifetime has passed; the supervisor
        refreshes with the server on its own schedule and hands out the newest token.
    ``{"type": "proxy_response", "status": S, "body": B}``
        Reply to ``proxy``: the API's HTTP status and JSON body (``null`` when empty), relayed
        unchanged, error responses included (``{"code", "message"}`` bodies).
    ``{"type": "error", "code": C, "message": M}``
        Reply to either when the supervisor itself will not or cannot answer. Codes the client
        understands: ``server_unavailable`` (the supervisor could not reach the API; the child
        may retry an idempotent call). Any other code is a refusal (e.g. ``no_token`` once the
        work item has ended). A request the supervisor's state table does not allow, or a
        malformed frame, is not answered at all: the supervisor closes the connection.

Secrets: :class:`TokenReply` keeps the token out of its ``repr``; nothing here logs.
"""

from __future__ import annotations

import json
import re
import socket
import struct
from dataclasses import dataclass, field
from typing import Any, Final, Literal
from urllib.parse import unquote

from privsep.client._exceptions import ConnectionLost, FrameTooLarge, ProtocolError
from privsep.client._surface import PROXY, find

MAX_FRAME: Final = 1024 * 1024
"""The largest payload a frame may carry, in bytes (the 4-byte header excluded)."""

_HEADER = struct.Struct(">I")

METHODS: Final = frozenset({"GET", "POST", "PUT", "DELETE"})

_PATH_CHARS = re.compile(r"^/[A-Za-z0-9._~%/-]*$")
_PERCENT_OK = re.compile(r"%(?![0-9A-Fa-f]{2})")


# --- framing ---------------------------------------------------------------------------------


def encode_frame(obj: dict[str, Any]) -> bytes:
    """One frame for ``obj``: header plus compact UTF-8 JSON. Refuses what a reader would."""
    if not isinstance(obj, dict) or not isinstance(obj.get("type"), str):
        raise ProtocolError("a frame must be a JSON object with a string 'type'")
    try:
        data = json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise ProtocolError(f"cannot encode a {obj['type']!r} message as JSON: {exc}") from None
    payload = data.encode("utf-8")
    if len(payload) > MAX_FRAME:
        raise FrameTooLarge(
            f"a {obj['type']!r} message is {len(payload)} bytes, over the {MAX_FRAME}-byte limit"
        )
    return _HEADER.pack(len(payload)) + payload


def send_frame(sock: socket.socket, obj: dict[str, Any]) -> None:
    """Write one frame. A peer that has gone away is :class:`ConnectionLost`."""
    frame = encode_frame(obj)
    try:
        sock.sendall(frame)
    except (BrokenPipeError, ConnectionResetError) as exc:
        raise ConnectionLost(f"credential socket closed while sending: {exc.strerror}") from None


def _recv_exactly(sock: socket.socket, n: int, what: str) -> bytearray:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        try:
            k = sock.recv_into(view[got:], n - got)
        except ConnectionResetError as exc:
            raise ConnectionLost(
                f"credential socket reset after {got} of {n} bytes of {what}: {exc.strerror}"
            ) from None
        if k == 0:
            raise ConnectionLost(f"credential socket closed after {got} of {n} bytes of {what}")
        got += k
    return buf


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ProtocolError(f"frame repeats the key {key!r}")
        out[key] = value
    return out


def _no_constants(name: str) -> Any:
    raise ProtocolError(f"frame contains {name}, which is not JSON")


def decode_payload(payload: bytes | bytearray) -> dict[str, Any]:
    """Decode one frame's payload (the bytes after the header) and check its shape."""
    try:
        text = bytes(payload).decode("utf-8")
        obj = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constants)
    except UnicodeDecodeError:
        raise ProtocolError("frame is not UTF-8") from None
    except json.JSONDecodeError as exc:
        raise ProtocolError(f"frame is not JSON: {exc.msg} at byte {exc.pos}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"frame is a JSON {type(obj).__name__}, not an object")
    if not isinstance(obj.get("type"), str):
        raise ProtocolError("frame has no string 'type'")
    return obj


def recv_frame(sock: socket.socket) -> dict[str, Any]:
    """Read one frame; the length is checked before a byte of payload is read or allocated."""
    (length,) = _HEADER.unpack(_recv_exactly(sock, _HEADER.size, "a frame header"))
    if length > MAX_FRAME:
        raise FrameTooLarge(f"peer announced a {length}-byte frame, over the {MAX_FRAME} limit")
    if length == 0:
        raise ProtocolError("peer sent an empty frame")
    return decode_payload(_recv_exactly(sock, length, "a frame"))


# --- messages --------------------------------------------------------------------------------


def _check_fields(obj: dict[str, Any], allowed: frozenset[str]) -> None:
    unknown = set(obj) - allowed
    if unknown:
        raise ProtocolError(f"{obj['type']!r} message has unknown fields {sorted(unknown)}")
    missing = allowed - set(obj)
    if missing:
        raise ProtocolError(f"{obj['type']!r} message lacks fields {sorted(missing)}")


def check_proxy_path(method: str, path: str) -> str:
    """Return ``path`` if a child may ask the supervisor to forward ``method path``, else raise
    :class:`ProtocolError` saying why. Both sides call this: the client before sending, the
    supervisor (via :func:`parse_request`) before forwarding."""
    if not isinstance(path, str) or len(path) > 2048:
        raise ProtocolError("proxy path must be a string of at most 2048 characters")
    if not _PATH_CHARS.match(path) or _PERCENT_OK.search(path):
        raise ProtocolError(
            f"proxy path {path[:100]!r} may hold only unreserved characters and %XX escapes"
        )
    # Checked raw and decoded: %2F..%2F must not become a '..' segment on the server.
    for segments in (path[1:].split("/"), unquote(path)[1:].split("/")):
        if any(s in ("", ".", "..") for s in segments):
            raise ProtocolError(f"proxy path {path[:100]!r} has an empty, '.' or '..' segment")
    if find(method, path, PROXY) is None:
        raise ProtocolError(
            f"proxy call {method[:20]} {path[:100]!r} is not a route of the sandbox surface"
        )
    return path


@dataclass(frozen=True)
class TokenRequest:
    """Child asks for its work item's current token."""

    type: Literal["token"] = "token"

    def to_wire(self) -> dict[str, Any]:
        return {"type": "token"}


@dataclass(frozen=True, kw_only=True)
class ProxyRequest:
    """Child asks the supervisor to make one API call for it, with the work item's token."""

    method: str
    path: str
    body: Any = None
    type: Literal["proxy"] = "proxy"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ProtocolError(f"proxy method must be one of {sorted(METHODS)}")
        check_proxy_path(self.method, self.path)

    def to_wire(self) -> dict[str, Any]:
        return {"type": "proxy", "method": self.method, "path": self.path, "body": self.body}


@dataclass(frozen=True, kw_only=True)
class TokenReply:
    """Supervisor hands out the current token; ``repr`` never shows it."""

    token: str = field(repr=False)
    expires_at: int
    type: Literal["token"] = "token"

    def __post_init__(self) -> None:
        if not isinstance(self.token, str) or not self.token:
            raise ProtocolError("token reply carries no token")
        if isinstance(self.expires_at, bool) or not isinstance(self.expires_at, int):
            raise ProtocolError("token reply's expires_at must be integer Unix seconds")

    def to_wire(self) -> dict[str, Any]:
        return {"type": "token", "token": self.token, "expires_at": self.expires_at}


@dataclass(frozen=True, kw_only=True)
class ProxyResponse:
    """Supervisor relays the API's status and JSON body."""

    status: int
    body: Any = None
    type: Literal["proxy_response"] = "proxy_response"

    def __post_init__(self) -> None:
        if isinstance(self.status, bool) or not isinstance(self.status, int):
            raise ProtocolError("proxy_response status must be an integer")
        if not 100 <= self.status <= 599:
            raise ProtocolError(f"proxy_response status {self.status} is not an HTTP status")

    def to_wire(self) -> dict[str, Any]:
        return {"type": "proxy_response", "status": self.status, "body": self.body}


@dataclass(frozen=True, kw_only=True)
class ErrorReply:
    """Supervisor will not or cannot answer; ``code`` is for programs, ``message`` for people."""

    code: str
    message: str
    type: Literal["error"] = "error"

    def __post_init__(self) -> None:
        if not isinstance(self.code, str) or not isinstance(self.message, str):
            raise ProtocolError("error reply's code and message must be strings")

    def to_wire(self) -> dict[str, Any]:
        return {"type": "error", "code": self.code, "message": self.message}


ToSupervisor = TokenRequest | ProxyRequest
"""Everything a child may send."""

ToSandbox = TokenReply | ProxyResponse | ErrorReply
"""Everything a supervisor may send."""

SERVER_UNAVAILABLE: Final = "server_unavailable"
"""``ErrorReply.code`` for "the supervisor could not reach the API"."""

_REQUEST_FIELDS = {
    "token": frozenset({"type"}),
    "proxy": frozenset({"type", "method", "path", "body"}),
}
_REPLY_FIELDS = {
    "token": frozenset({"type", "token", "expires_at"}),
    "proxy_response": frozenset({"type", "status", "body"}),
    "error": frozenset({"type", "code", "message"}),
}


def parse_request(obj: dict[str, Any]) -> ToSupervisor:
    """Validate a decoded frame from a child. Unknown types and fields are
    :class:`ProtocolError`; the supervisor should then close the connection."""
    kind = obj.get("type")
    if not isinstance(kind, str) or kind not in _REQUEST_FIELDS:
        raise ProtocolError(f"unknown request type {str(kind)[:50]!r}")
    _check_fields(obj, _REQUEST_FIELDS[kind])
    if kind == "token":
        return TokenRequest()
    if not isinstance(obj["method"], str) or not isinstance(obj["path"], str):
        raise ProtocolError("proxy method and path must be strings")
    return ProxyRequest(method=obj["method"], path=obj["path"], body=obj["body"])


def parse_reply(obj: dict[str, Any], *, expect: str) -> ToSandbox:
    """Validate a decoded frame from the supervisor: it must be a reply of type ``expect`` or
    an ``error``; anything else is :class:`ProtocolError` (the conversation is out of step)."""
    kind = obj.get("type")
    if not isinstance(kind, str) or kind not in _REPLY_FIELDS:
        raise ProtocolError(f"unknown reply type {str(kind)[:50]!r}")
    if kind not in (expect, "error"):
        raise ProtocolError(f"expected a {expect!r} reply, got {kind!r}")
    _check_fields(obj, _REPLY_FIELDS[kind])
    if kind == "token":
        return TokenReply(token=obj["token"], expires_at=obj["expires_at"])
    if kind == "proxy_response":
        return ProxyResponse(status=obj["status"], body=obj["body"])
    return ErrorReply(code=obj["code"], message=obj["message"])


def send_message(sock: socket.socket, message: ToSupervisor | ToSandbox) -> None:
    """Frame and send one message."""
    send_frame(sock, message.to_wire())
