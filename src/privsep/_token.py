"""The one wrapper that keeps a bearer token out of ``repr``, ``str``, logs and pickles.

Every part of privsep holds tokens: the client SDK (its work token), ``secrets`` (the tokens the
server issues), the supervisor (its session, and each sandbox's work token on the credential
socket). They share this class so that hiding a token is done, and reviewed, in one place.

It sits at the top of the package, outside every subpackage, and imports only the standard
library: ``privsep.client`` may import nothing trusted and ``privsep.secrets`` nothing else of
privsep, and both can import this (an import-linter contract keeps it free of the rest).
"""

from __future__ import annotations

__all__ = ["Token"]


class Token:
    """A bearer token whose value never shows up by accident.

    ``str()``, ``repr()`` and f-strings give ``Token(expires_at=..., ***)``; only :meth:`reveal`
    returns the value, to be called where it is written to a socket or a header. Subclasses
    show more of what is public about a token by overriding :meth:`_shown`.
    """

    __slots__ = ("__value", "expires_at")

    def __init__(self, value: str, expires_at: int) -> None:
        self.__value = value
        self.expires_at = expires_at

    def reveal(self) -> str:
        """The token itself. Call only where it leaves the process, never for logging."""
        return self.__value

    def scrub(self, text: str) -> str:
        """``text`` with every copy of the token replaced, for messages that quote others'."""
        return text.replace(self.__value, "***") if self.__value else text

    def _shown(self) -> str:
        return f"expires_at={self.expires_at}"

    def __repr__(self) -> str:
        return f"Token({self._shown()}, ***)"

    __str__ = __repr__

    def __reduce__(self) -> str:
        raise TypeError("a Token is not picklable: pass token.reveal() where it is meant to go")
