"""The credential-socket protocol, on real connected unix sockets.

Each test speaks out of turn the way a hostile or broken peer would: oversized, truncated,
malformed frames and unknown messages must be refused cleanly, and an oversized frame before a
single payload byte is read or allocated.
"""

from __future__ import annotations

import json
import socket
import struct
import threading
import tracemalloc
from collections.abc import Iterator

import pytest

from privsep.client import ConnectionLost, FrameTooLarge, ProtocolError, _wire


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    a.settimeout(5)
    b.settimeout(5)
    with a, b:
        yield a, b


def raw(payload: bytes, length: int | None = None) -> bytes:
    return struct.pack(">I", len(payload) if length is None else length) + payload


def test_frames_round_trip(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    messages: list[_wire.ToSupervisor | _wire.ToSandbox] = [
        _wire.TokenRequest(),
        _wire.ProxyRequest(method="PUT", path="/v1/task/xcoms/k%20ey", body={"value": [1, "é"]}),
        _wire.TokenReply(token="tok", expires_at=1_900_000_000),
        _wire.ProxyResponse(status=404, body={"code": "not_found", "message": "no"}),
        _wire.ErrorReply(code="no_token", message="the attempt ended"),
    ]
    for message in messages:
        _wire.send_message(a, message)
        assert _wire.recv_frame(b) == message.to_wire()
    # Both directions parse back to the same objects.
    assert _wire.parse_request(messages[1].to_wire()) == messages[1]
    assert _wire.parse_reply(messages[2].to_wire(), expect="token") == messages[2]
    assert _wire.parse_reply(messages[4].to_wire(), expect="proxy_response") == messages[4]


def test_the_header_is_four_bytes_big_endian_then_utf8_json() -> None:
    frame = _wire.encode_frame({"type": "token"})
    assert frame == b'\x00\x00\x00\x10{"type":"token"}'


def test_an_oversized_frame_is_refused_before_reading_or_allocating(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = pair
    # Announce 4 GiB and send nothing more: a reader that tried to read would block (and
    # time out); one that allocated would need 4 GiB.
    a.sendall(struct.pack(">I", 0xFFFFFFFF))
    tracemalloc.start()
    try:
        with pytest.raises(FrameTooLarge, match="4294967295-byte frame"):
            _wire.recv_frame(b)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024


def test_one_byte_over_the_limit_is_refused_and_the_limit_itself_is_not(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = pair
    a.sendall(struct.pack(">I", _wire.MAX_FRAME + 1))
    with pytest.raises(FrameTooLarge):
        _wire.recv_frame(b)
    body = {"type": "proxy_response", "status": 200, "body": ""}
    filler = _wire.MAX_FRAME - len(json.dumps(body, separators=(",", ":")))
    body["body"] = "x" * filler
    frame = _wire.encode_frame(body)
    assert len(frame) == 4 + _wire.MAX_FRAME
    c, d = socket.socketpair()
    with c, d:
        writer = threading.Thread(target=c.sendall, args=(frame,))
        writer.start()
        assert _wire.recv_frame(d)["body"] == "x" * filler
        writer.join()


def test_a_sender_refuses_to_build_an_oversized_frame() -> None:
    with pytest.raises(FrameTooLarge, match="over the 1048576-byte limit"):
        _wire.encode_frame({"type": "proxy", "body": "x" * _wire.MAX_FRAME})


def test_a_truncated_frame_is_connection_lost(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    a.sendall(raw(b'{"type":"tok', length=16))
    a.shutdown(socket.SHUT_WR)
    with pytest.raises(ConnectionLost, match="closed after 12 of 16 bytes"):
        _wire.recv_frame(b)


def test_a_truncated_header_and_a_clean_eof_are_connection_lost(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = pair
    a.sendall(b"\x00\x00")
    a.shutdown(socket.SHUT_WR)
    with pytest.raises(ConnectionLost, match="2 of 4 bytes of a frame header"):
        _wire.recv_frame(b)
    c, d = socket.socketpair()
    with c, d:
        c.close()
        with pytest.raises(ConnectionLost, match="0 of 4"):
            _wire.recv_frame(d)


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"", "empty frame"),
        (b"\xff\xfe", "not UTF-8"),
        (b"{not json", "not JSON"),
        (b"[1, 2]", "JSON list, not an object"),
        (b'{"kind": "token"}', "no string 'type'"),
        (b'{"type": 1}', "no string 'type'"),
        (b'{"type": "token", "type": "proxy"}', "repeats the key 'type'"),
        (b'{"type": "proxy_response", "status": 200, "body": NaN}', "NaN"),
    ],
)
def test_malformed_frames_are_protocol_errors(
    pair: tuple[socket.socket, socket.socket], payload: bytes, message: str
) -> None:
    a, b = pair
    a.sendall(raw(payload))
    with pytest.raises(ProtocolError, match=message):
        _wire.recv_frame(b)


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        ({"type": "GetVariable"}, "unknown request type 'GetVariable'"),
        ({"type": "token_reply"}, "unknown request type"),
        ({"type": "proxy_response", "status": 200, "body": None}, "unknown request type"),
        ({"type": "token", "scope": "operator"}, r"unknown fields \['scope'\]"),
        ({"type": "proxy", "method": "GET", "path": "/v1/task/context"}, r"lacks fields"),
        (
            {"type": "proxy", "method": "PATCH", "path": "/v1/task/context", "body": None},
            "proxy method must be one of",
        ),
        (
            {"type": "proxy", "method": "GET", "path": "/v1/operator/runs", "body": None},
            "not a route of the sandbox surface",
        ),
        (
            {"type": "proxy", "method": "GET", "path": "/v1/supervisor/claim", "body": None},
            "not a route of the sandbox surface",
        ),
        (
            {"type": "proxy", "method": "GET", "path": "/v1/task/nothing-here", "body": None},
            "not a route of the sandbox surface",
        ),
        (
            {"type": "proxy", "method": "DELETE", "path": "/v1/task/xcoms/k", "body": None},
            "not a route of the sandbox surface",
        ),
        (
            {"type": "proxy", "method": "GET", "path": "/v1/task/variables/a/b", "body": None},
            "not a route of the sandbox surface",
        ),
        (
            {"type": "proxy", "method": "GET", "path": "/v1/task/../operator/x", "body": None},
            "'..' segment",
        ),
        (
            {"type": "proxy", "method": "GET", "path": "/v1/task/%2e%2e/operator", "body": None},
            "'..' segment",
        ),
        (
            {"type": "proxy", "method": "GET", "path": "/v1/task/a%2F..%2Fb", "body": None},
            "'..' segment",
        ),
        (
            {"type": "proxy", "method": "GET", "path": "/v1/task/context?x=1", "body": None},
            "unreserved characters",
        ),
        (
            {"type": "proxy", "method": "GET", "path": "/v1/task/%zz", "body": None},
            "unreserved characters",
        ),
        (
            {"type": "proxy", "method": "GET", "path": "http://evil/v1/task/x", "body": None},
            "unreserved characters",
        ),
    ],
)
def test_parse_request_rejects_unknown_types_fields_and_routes(
    obj: dict[str, object], message: str
) -> None:
    with pytest.raises(ProtocolError, match=message):
        _wire.parse_request(obj)


def test_parse_reply_insists_on_the_expected_type() -> None:
    with pytest.raises(ProtocolError, match="expected a 'token' reply, got 'proxy_response'"):
        _wire.parse_reply({"type": "proxy_response", "status": 200, "body": None}, expect="token")
    with pytest.raises(ProtocolError, match="unknown reply type"):
        _wire.parse_reply({"type": "hello"}, expect="token")
    with pytest.raises(ProtocolError, match="unknown fields"):
        _wire.parse_reply(
            {"type": "token", "token": "t", "expires_at": 1, "scope": "operator"}, expect="token"
        )
    with pytest.raises(ProtocolError, match="integer Unix seconds"):
        _wire.parse_reply({"type": "token", "token": "t", "expires_at": "soon"}, expect="token")
    with pytest.raises(ProtocolError, match="not an HTTP status"):
        _wire.parse_reply(
            {"type": "proxy_response", "status": 1000, "body": None}, expect="proxy_response"
        )


def test_a_token_reply_keeps_its_token_out_of_repr() -> None:
    reply = _wire.TokenReply(token="eyJ.secret.sig", expires_at=5)
    assert "secret" not in repr(reply)
    assert "secret" not in str(reply)
