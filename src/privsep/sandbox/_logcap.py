"""Capture a child's output into a log file that is safe to ``cat`` and cannot grow without end.

The supervisor reads the child's stdout/stderr pipe from its reactor thread (never blocking: the
pipe is non-blocking and read only when ready) and feeds every chunk here. What reaches the file:

* control characters (C0 except tab and newline, DEL, C1) and invisible format characters
  (bidi overrides, zero-width characters, line/paragraph separators) written as ``\\xNN`` or
  ``\\uNNNN``, so an ANSI escape or a terminal-title sequence is text, not an action;
  invalid UTF-8 becomes ``\\xNN`` too;
* at most ``max_line_bytes`` per line (the rest of an overlong line is dropped, with a marker),
  at most ``max_lines`` lines and ``max_bytes`` bytes in all (then one final marker).

After a cap the pipe is still drained, so a child that floods its output never blocks on a full
pipe and never notices; the bytes are only counted.
"""

from __future__ import annotations

import codecs
import os
import re

_C0_C1 = {c: f"\\x{c:02x}" for c in [*range(0x00, 0x20), 0x7F, *range(0x80, 0xA0)]}
del _C0_C1[ord("\t")], _C0_C1[ord("\n")]
_FORMAT_RE = re.compile("[\u00ad\u061c\u180e\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff]")


def escape(text: str) -> str:
    """Escape control and invisible format characters; keeps tab and newline."""
    text = text.translate(_C0_C1)
    return _FORMAT_RE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


class LogCapture:
    """Escaping, capped writer from a byte stream into an open log file descriptor."""

    LINE_MARK = " [privsep: line truncated]"

    def __init__(self, fd: int, *, max_bytes: int, max_lines: int, max_line_bytes: int) -> None:
        self._fd = fd
        self._max_bytes = max_bytes
        self._max_lines = max_lines
        self._max_line = max_line_bytes
        self._decoder = codecs.getincrementaldecoder("utf-8")("backslashreplace")
        self._line_len = 0
        self._line_cut = False
        self._lines = 0
        self.written = 0
        self.received = 0
        self.full = False
        self.truncated = False

    def feed(self, data: bytes) -> None:
        """Process one chunk read from the child."""
        self.received += len(data)
        if self.full or not data:
            return
        self._emit(escape(self._decoder.decode(data)))

    def finish(self) -> None:
        """The child closed its output: flush a trailing partial character."""
        if not self.full:
            self._emit(escape(self._decoder.decode(b"", final=True)))

    def _emit(self, text: str) -> None:
        out: list[bytes] = []
        budget = self._max_bytes - self.written
        for i, part in enumerate(text.split("\n")):
            if i:  # a newline ended the previous part
                out.append(b"\n")
                budget -= 1
                self._lines += 1
                self._line_len = 0
                self._line_cut = False
                if self._lines >= self._max_lines:
                    self._stop(out, f"line cap of {self._max_lines} lines reached")
                    return
            if not part or self._line_cut:
                continue
            raw = part.encode("utf-8", "surrogateescape")
            room = self._max_line - self._line_len
            if len(raw) > room:
                raw = raw[:room].decode("utf-8", "ignore").encode() + self.LINE_MARK.encode()
                self._line_cut = True
                self.truncated = True
            if len(raw) > budget:
                out.append(raw[: max(budget, 0)].decode("utf-8", "ignore").encode())
                self._stop(out, f"byte cap of {self._max_bytes} bytes reached")
                return
            out.append(raw)
            budget -= len(raw)
            self._line_len += len(raw)
        self._write(b"".join(out))

    def _stop(self, out: list[bytes], why: str) -> None:
        out.append(f"\n[privsep: output truncated: {why}]\n".encode())
        self._write(b"".join(out))
        self.full = True
        self.truncated = True

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
        self.written += len(data)
