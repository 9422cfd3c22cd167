"""What a workflow's ``schedule`` value means: the ticks it names, in UTC.

This module changes when the accepted schedule syntax changes, and for nothing else: it knows
neither the database nor when runs are created (:mod:`.scheduled_runs` does that).

A ``schedule`` is a cron string (evaluated in UTC; five fields, or six with seconds), a preset
(``@hourly``, ``@daily``/``@midnight``, ``@weekly``, ``@monthly``, ``@yearly``/``@annually``) or
a number of seconds (a fixed interval).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Final, Protocol, cast

from croniter import croniter  # type: ignore[import-untyped]

PRESETS: Final[Mapping[str, str]] = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
"""The presets we accept, mapped here rather than left to croniter so that the accepted set
does not change with the installed croniter version."""


class InvalidSchedule(ValueError):
    """A workflow's ``schedule`` value that names no sequence of ticks."""


class Schedule(Protocol):
    """A sequence of ticks in UTC."""

    def next_after(self, moment: datetime) -> datetime:
        """The first tick strictly after ``moment``."""
        ...

    def latest_between(self, after: datetime, now: datetime) -> datetime | None:
        """The latest tick ``t`` with ``after < t <= now``, or None if there is none."""
        ...


@dataclass(frozen=True)
class CronSchedule:
    """A cron expression (presets already expanded), evaluated in UTC."""

    expression: str

    def next_after(self, moment: datetime) -> datetime:
        return cast(datetime, croniter(self.expression, moment).get_next(datetime))

    def latest_between(self, after: datetime, now: datetime) -> datetime | None:
        if self.next_after(after) > now:
            return None
        # croniter's get_prev is strictly before its start, so ``now`` itself, if it is a tick,
        # is the next tick after that one; no epsilon arithmetic needed.
        previous = cast(datetime, croniter(self.expression, now).get_prev(datetime))
        following = self.next_after(previous)
        return following if following <= now else previous


@dataclass(frozen=True)
class IntervalSchedule:
    """Every ``seconds`` seconds, counted from the base it is asked about.

    The arithmetic is in whole microseconds (the database's resolution), so a tick is never
    missed or doubled by floating-point rounding at a boundary.
    """

    seconds: float

    @property
    def _step_us(self) -> int:
        return max(1, round(self.seconds * 1_000_000))

    def next_after(self, moment: datetime) -> datetime:
        return moment + timedelta(microseconds=self._step_us)

    def latest_between(self, after: datetime, now: datetime) -> datetime | None:
        elapsed_us = (now - after) // timedelta(microseconds=1)
        steps = elapsed_us // self._step_us
        if steps < 1:
            return None
        return after + timedelta(microseconds=steps * self._step_us)


def parse_schedule(value: str | float | None) -> Schedule | None:
    """The :class:`Schedule` a definition's ``schedule`` names; None if it has none.

    Raises :class:`InvalidSchedule` for a value that is not a valid cron string, a known
    preset, or a positive finite number of seconds.
    """
    if value is None:
        return None
    if isinstance(value, bool):
        raise InvalidSchedule(f"schedule {value!r} is neither a cron string nor seconds")
    if isinstance(value, int | float):
        seconds = float(value)
        if not math.isfinite(seconds) or seconds <= 0:
            raise InvalidSchedule(
                f"interval schedule must be a positive number of seconds, not {value!r}"
            )
        return IntervalSchedule(seconds)
    text = " ".join(value.split())
    if text.startswith("@"):
        expanded = PRESETS.get(text.lower())
        if expanded is None:
            known = ", ".join(PRESETS)
            raise InvalidSchedule(f"unknown schedule preset {value!r}; known presets: {known}")
        return CronSchedule(expanded)
    if not text or not croniter.is_valid(text):
        raise InvalidSchedule(f"schedule {value!r} is not a valid cron expression")
    return CronSchedule(text)
