"""Output is captured capped and escaped, and a flood never stalls the supervisor."""

from __future__ import annotations

import time

from hostile_kit import HOSTILE_LIMITS, Hostile

from privsep.sandbox import ExitReason


def test_log_flood_without_newline_is_capped_and_does_not_block(hostile: Hostile) -> None:
    flood = hostile.start("log_flood", str(10 << 20))
    # While the flood runs, other sandboxes start and finish as usual.
    started = time.monotonic()
    other = hostile.run("ids")
    assert other.status.ok
    assert time.monotonic() - started < 15
    out = hostile.collect(flood)
    assert out.status.reason is ExitReason.SUCCEEDED
    output = out.handle.output()
    assert output.bytes_received >= 10 << 20
    assert output.truncated
    assert len(output.data) <= HOSTILE_LIMITS.log_max_bytes + 200
    first_line = output.data.split(b"\n", 1)[0]
    assert first_line == b"A" * HOSTILE_LIMITS.log_max_line_bytes + b" [privsep: line truncated]"


def test_ansi_and_control_characters_are_escaped(hostile: Hostile) -> None:
    out = hostile.run("ansi")
    data = out.handle.output().data
    assert b"\x1b" not in data and b"\x07" not in data and b"\r" not in data
    assert "\u202e".encode() not in data and b"\xc2\x9b" not in data
    assert b"\\x1b[31mRED\\x1b[0m \\x1b]0;pwned-title\\x07" in data
    assert b"cr\\x0doverwrite" in data
    assert b"bidi \\u202eevil\\u202c zero\\u200bwidth \\x9b31m c1" in data
