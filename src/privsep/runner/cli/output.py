"""What the operator commands print for people: tables, fields, times, and text made safe.

Text that workflow code controls (parse errors, task errors) may hold terminal escape
sequences; everything shown here has control characters escaped, never raw. Connection secrets
are masked again before printing, so a server bug cannot put a password on a terminal.
"""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Sequence
from datetime import datetime
from typing import Any

MASK = "***"
SECRET_FIELDS = ("password", "extra")


def _escape_char(ch: str) -> str:
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def clean(text: str, *, keep_newlines: bool = False, keep_tabs: bool = False) -> str:
    """``text`` safe for a terminal: control and format characters (escape sequences, bidi
    overrides) are shown as ``\\x1b``-style escapes."""
    out = []
    for ch in text:
        if (keep_newlines and ch == "\n") or (keep_tabs and ch == "\t"):
            out.append(ch)
        elif ch == "\t":
            out.append("    ")
        elif unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp"):
            out.append(_escape_char(ch))
        else:
            out.append(ch)
    return "".join(out)


def one_line(text: str, limit: int = 500) -> str:
    """A message for a one-line error: newlines folded, controls escaped, length bounded."""
    flat = " ".join(text.split())
    flat = clean(flat)
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def mask_secrets(record: dict[str, Any]) -> dict[str, Any]:
    """A copy of a connection record with ``password`` and ``extra`` masked if set.

    The server masks them already; this makes "never printed" hold even if it did not.
    """
    return {k: (MASK if k in SECRET_FIELDS and v is not None else v) for k, v in record.items()}


def emit_json(value: Any) -> None:
    print(json.dumps(value, indent=2))


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return one_line(str(value), limit=200)


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
    print("  ".join(h.upper().ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip())
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def print_fields(pairs: Sequence[tuple[str, Any]]) -> None:
    width = max(len(k) for k, _ in pairs)
    for key, value in pairs:
        print(f"{key + ':':<{width + 1}}  {_cell(value)}")


def _parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        return None


def when(value: Any) -> str | None:
    """An ISO timestamp from the server as ``2024-05-01 12:00:03`` (UTC, seconds)."""
    moment = _parse_time(value)
    return moment.strftime("%Y-%m-%d %H:%M:%S") if moment else None


def duration_seconds(started: Any, ended: Any) -> float | None:
    """Seconds between two server timestamps; None unless both are known."""
    start, end = _parse_time(started), _parse_time(ended)
    if start is None or end is None:
        return None
    return round(max(0.0, (end - start).total_seconds()), 3)


def format_duration(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"
