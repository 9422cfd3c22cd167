"""Keeping secret values out of reprs and logs.

Why a wrapper and not a ``str`` subclass: a ``str`` subclass leaks through every string
operation (``"x" + s``, ``f"{s}"``, ``"".join``, ``json.dumps``) whatever its ``__str__``
says. :class:`Secret` is not a string at all, so the only way to the value is
:meth:`Secret.reveal`, and that call is easy to grep for.
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Iterable

__all__ = ["MASK", "Secret", "redact"]

MASK = "***"


class Secret:
    """A secret string that prints as ``***``; :meth:`reveal` returns the value."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        if not isinstance(value, str):
            raise TypeError("Secret wraps a str")
        self._value = value

    def reveal(self) -> str:
        """The value itself. Call only where it is used, never for display."""
        return self._value

    def __repr__(self) -> str:
        return MASK

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return MASK

    def __eq__(self, other: object) -> bool:
        # Constant time, so comparing a presented secret with a stored one leaks no prefix.
        if not isinstance(other, Secret):
            return NotImplemented
        return hmac.compare_digest(self._value.encode(), other._value.encode())

    def __hash__(self) -> int:
        return hash((Secret, self._value))

    def __reduce__(self) -> str:
        raise TypeError("a Secret is not picklable: pass secret.reveal() where it is meant to go")


def redact(text: str, secrets: Iterable[str | Secret]) -> str:
    """``text`` with every occurrence of every secret replaced by ``***``, for logging.

    Longer secrets are matched first, so a secret that contains another is masked whole and
    nothing of it is left behind. Empty secrets are ignored (they would match everywhere).
    """
    values = {s.reveal() if isinstance(s, Secret) else s for s in secrets}
    values.discard("")
    if not values:
        return text
    pattern = "|".join(re.escape(v) for v in sorted(values, key=len, reverse=True))
    return re.sub(pattern, MASK, text)
