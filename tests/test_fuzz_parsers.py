"""Hypothesis over every parser that reads what an attacker or a careless operator writes.

The credential-socket framing (a sandbox writes it), the configuration loader (an operator
writes it, root reads it), the manifest loader (workflow authors write it, root reads it) and
the parse-result validator (a sandbox's definition file decides it). Each must end in a value
or in its own typed error: no other exception, no hang, and no allocation that the input's
length header alone decides.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import struct
import tempfile
import threading
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from privsep.client._exceptions import ConnectionLost, FrameTooLarge, ProtocolError
from privsep.client._wire import (
    MAX_FRAME,
    check_proxy_path,
    decode_payload,
    parse_reply,
    parse_request,
    recv_frame,
)
from privsep.runner.config.loader import ConfigError, load_config
from privsep.runner.config.schema import OPTIONS
from privsep.runner.sources.manifest import ManifestError, load_manifest

FUZZ = settings(
    max_examples=300, deadline=None, database=None, suppress_health_check=list(HealthCheck)
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=12), inner),
    max_leaves=20,
)
messages = st.dictionaries(
    st.sampled_from(["type", "method", "path", "body", "token", "expires_at", "status", "x"]),
    json_values | st.sampled_from(["token", "proxy", "GET", "POST", "/v1/task/context"]),
)


# -- the credential socket's framing ------------------------------------------------------


@FUZZ
@given(payload=st.binary(max_size=512))
def test_any_payload_decodes_or_is_a_protocol_error(payload: bytes) -> None:
    try:
        obj = decode_payload(payload)
    except ProtocolError:
        return
    assert isinstance(obj, dict) and isinstance(obj.get("type"), str)


@FUZZ
@given(obj=messages)
def test_any_request_or_reply_object_parses_or_is_a_protocol_error(obj: dict[str, Any]) -> None:
    for parse in (parse_request, lambda o: parse_reply(o, expect="token")):
        with contextlib.suppress(ProtocolError):
            parse(obj)


@FUZZ
@given(
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "get", ""]),
    path=st.text(max_size=80) | st.from_regex(r"/v1/(task|parse|trigger)/[A-Za-z0-9%./_-]{0,30}"),
)
def test_a_proxy_path_that_passes_never_climbs_out(method: str, path: str) -> None:
    from urllib.parse import unquote

    try:
        checked = check_proxy_path(method, path)
    except ProtocolError:
        return
    segments = unquote(checked).split("/")[1:]
    assert checked.startswith(("/v1/task/", "/v1/parse/", "/v1/trigger/"))
    assert not {"", ".", ".."} & set(segments[:-1]) and ".." not in segments


def _recv_from(data: bytes) -> dict[str, Any] | Exception:
    left, right = socket.socketpair()
    try:
        writer = threading.Thread(target=_write_and_close, args=(left, data))
        writer.start()
        right.settimeout(10)  # a reader that waits for bytes that never come is a hang
        try:
            return recv_frame(right)
        except (ConnectionLost, FrameTooLarge, ProtocolError) as exc:
            return exc
        finally:
            writer.join(10)
    finally:
        right.close()


def _write_and_close(sock: socket.socket, data: bytes) -> None:
    try:
        sock.sendall(data)
    except OSError:
        pass  # the reader stopped early (a refused header): that is the point
    finally:
        sock.close()


@FUZZ
@given(
    length=st.integers(min_value=0, max_value=2**32 - 1),
    body=st.binary(max_size=256),
)
def test_any_frame_is_read_or_refused_without_trusting_its_length(length: int, body: bytes) -> None:
    tracemalloc.start()
    try:
        outcome = _recv_from(struct.pack(">I", length) + body)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    if length > MAX_FRAME:
        assert isinstance(outcome, FrameTooLarge), outcome
    # A header alone never makes the reader allocate more than one frame's limit.
    assert peak < MAX_FRAME + (64 << 10), peak
    if isinstance(outcome, dict):
        assert length == len(body) or length < len(body)


# -- the configuration loader --------------------------------------------------------------

# No ``_cmd`` key: the loader would run it, and a fuzzer must not choose what root runs.
config_keys = st.sampled_from(sorted({o.name for o in OPTIONS}))
config_values = (
    st.text(max_size=30).map(json.dumps)
    | st.integers().map(str)
    | st.booleans().map(lambda b: str(b).lower())
    | st.floats(allow_nan=False, allow_infinity=False).map(repr)
    | st.text(max_size=20)
)


@st.composite
def config_files(draw: st.DrawFn) -> bytes:
    if draw(st.booleans()):
        return draw(st.binary(max_size=300))
    lines = []
    for key in draw(st.lists(config_keys, max_size=6)):
        section, name = key.split(".", 1)
        suffix = draw(st.sampled_from(["", "", "_file", "_unknown"]))
        lines.append(f"[{section}]\n{name}{suffix} = {draw(config_values)}")
    return "\n".join(lines).encode()


@FUZZ
@given(content=config_files())
def test_any_config_file_loads_or_is_a_config_error(content: bytes) -> None:
    with tempfile.TemporaryDirectory() as home:
        os.chmod(home, 0o700)
        path = Path(home) / "privsep.toml"
        path.write_bytes(content)
        path.chmod(0o600)
        try:
            cfg = load_config(None, environ={"PRIVSEP_HOME": home, "PATH": "/nonexistent"})
        except ConfigError as exc:
            assert str(exc) and "Traceback" not in str(exc)
            return
        for opt in OPTIONS:
            if not opt.secret:
                cfg.get(opt.name)


# -- the manifest loader -------------------------------------------------------------------


@FUZZ
@given(
    document=json_values
    | st.dictionaries(
        st.just("workflows"),
        st.dictionaries(
            st.text(max_size=20),
            st.text(max_size=40) | st.dictionaries(st.sampled_from(["uri", "x"]), json_values),
        ),
    ),
    raw=st.none() | st.binary(max_size=200),
)
def test_any_manifest_loads_or_is_a_manifest_error(document: Any, raw: bytes | None) -> None:
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "manifest.json").write_bytes(
            raw if raw is not None else json.dumps(document).encode()
        )
        try:
            manifest = load_manifest(Path(folder))
        except ManifestError as exc:
            assert str(exc).startswith(folder)
            return
        assert manifest is not None
        for entry in manifest.entries:
            # Whatever the manifest says, a path it yields lies inside the folder.
            assert os.path.commonpath([folder, entry.path]) == folder, entry


# -- the parse-result validator ------------------------------------------------------------


@FUZZ
@given(body=json_values | st.dictionaries(st.sampled_from(["workflows", "error"]), json_values))
def test_any_parse_result_validates_or_is_refused(body: Any) -> None:
    from pydantic import ValidationError

    from privsep.server.schemas import ParseResultRequest

    try:
        result = ParseResultRequest.model_validate(body)
    except ValidationError:
        return
    for wf in result.workflows:
        assert 1 <= len(wf.workflow_id) <= 250


@pytest.mark.parametrize("length", [MAX_FRAME + 1, 2**32 - 1])
def test_an_oversized_header_is_refused_before_any_payload(length: int) -> None:
    assert isinstance(_recv_from(struct.pack(">I", length)), FrameTooLarge)
