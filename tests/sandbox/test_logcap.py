"""Output capture: escaped, capped, and never confused by partial characters."""

from __future__ import annotations

import os
from pathlib import Path

from privsep.sandbox._logcap import LogCapture, escape


def capture(tmp_path: Path, chunks: list[bytes], **caps: int) -> tuple[bytes, LogCapture]:
    path = tmp_path / "log"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    limits = {"max_bytes": 1 << 20, "max_lines": 1000, "max_line_bytes": 1000, **caps}
    cap = LogCapture(fd, **limits)
    for chunk in chunks:
        cap.feed(chunk)
    cap.finish()
    os.close(fd)
    return path.read_bytes(), cap


def test_terminal_escapes_become_text() -> None:
    raw = "\x1b[31mred\x1b[0m\x1b]0;owned\x07\rover\u202edir\tok\n"
    assert escape(raw) == "\\x1b[31mred\\x1b[0m\\x1b]0;owned\\x07\\x0dover\\u202edir\tok\n"


def test_utf8_split_across_reads_survives(tmp_path: Path) -> None:
    data = "héllo ✓\n".encode()
    out, _ = capture(tmp_path, [data[:2], data[2:7], data[7:]])
    assert out == data


def test_invalid_utf8_is_escaped(tmp_path: Path) -> None:
    out, _ = capture(tmp_path, [b"a\xffb\n"])
    assert out == b"a\\xffb\n"


def test_long_line_is_cut_once_and_the_next_line_kept(tmp_path: Path) -> None:
    out, _ = capture(tmp_path, [b"x" * 500, b"y" * 500, b"\nnext\n"], max_line_bytes=100)
    first, second, _ = out.split(b"\n")
    assert first == b"x" * 100 + LogCapture.LINE_MARK.encode()
    assert second == b"next"


def test_byte_cap_keeps_counting(tmp_path: Path) -> None:
    chunks = [b"z" * 65536] * 20
    out, cap = capture(tmp_path, chunks, max_bytes=4096, max_line_bytes=1 << 20)
    assert len(out) < 4096 + 100
    assert out.endswith(b"[privsep: output truncated: byte cap of 4096 bytes reached]\n")
    assert cap.received == 20 * 65536
    assert cap.full


def test_line_cap(tmp_path: Path) -> None:
    out, cap = capture(tmp_path, [b"l\n" * 100], max_lines=10)
    assert out.count(b"\n") == 12  # 10 lines, then the marker on its own line
    assert b"line cap of 10 lines reached" in out
    assert cap.full
