"""The scheduler's one rule about time: every ``now`` is an aware datetime, worked on in UTC.

Every entry point takes ``now`` from its caller instead of reading a clock (so a test can walk a
schedule tick by tick), which makes each of them a place where a naive datetime could slip in;
they all check it here, so the rule and its message change in one place.
"""

from __future__ import annotations

from datetime import UTC, datetime


def require_aware(now: datetime) -> datetime:
    """``now`` in UTC; a naive datetime is refused, since its meaning would be a guess."""
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError(f"naive datetime {now!r}: the scheduler works in aware UTC only")
    return now.astimezone(UTC)
