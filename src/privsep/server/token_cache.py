"""Remember tokens whose signature already verified, until they expire.

An Ed25519 check costs a few hundred microseconds, more than the rest of a small API call.
Caching the *signature and claims* check is safe because nothing about it can change before
``exp``, with one exception: the key that signed it may be retired. So a hit counts only while
the token's kid is still among the verifiers the caller passes (the server's current key set),
and a retired key's tokens fall out of the cache as soon as the key set drops it. What else can
change (the attempt ended, the supervisor was deactivated) is checked against the database on
every request, cached or not.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Container

from privsep.secrets.tokens import Claims

DEFAULT_MAX_ENTRIES = 50_000
# How often ``put`` drops the expired entries. Without it they stayed until the cache was full:
# a server handing out a few thousand tokens a minute grew by megabytes a minute toward the
# cap, holding tokens dead for hours. With it the cache holds about one token lifetime's worth,
# and less than that since a work item's tokens are dropped when it reports its end
# (:meth:`VerifiedTokenCache.forget_subject`): the soak's server grew 1.75 MiB/min for the
# first ten minutes with 600 s work tokens, and 0.12 MiB/min with 30 s ones.
SWEEP_INTERVAL = 30.0


class VerifiedTokenCache:
    """Raw token → verified claims, bounded, with expiry checked on every hit."""

    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        self._entries: dict[str, Claims] = {}
        # Each subject's tokens, so a work item's can go when it ends. May name tokens already
        # gone (evicted for room); every sweep rebuilds it from the entries.
        self._by_subject: dict[str, list[str]] = {}
        self._max = max_entries
        self._lock = threading.Lock()
        self._next_sweep = 0.0

    def get(
        self,
        token: str,
        scopes: frozenset[str],
        verifiers: Container[str],
        now: float | None = None,
    ) -> Claims | None:
        """The token's claims if it verified before, its scope is one of ``scopes`` and its
        kid is still in ``verifiers`` (not retired); else ``None``."""
        claims = self._entries.get(token)
        if claims is None:
            return None
        t = time.time() if now is None else now
        if (
            claims.exp <= t
            or claims.nbf > t + 5
            or claims.scope not in scopes
            or claims.kid not in verifiers
        ):
            return None  # the full check runs again and raises the right error
        return claims

    def put(self, token: str, claims: Claims, now: float | None = None) -> None:
        t = time.time() if now is None else now
        with self._lock:
            if len(self._entries) >= self._max or t >= self._next_sweep:
                self._next_sweep = t + SWEEP_INTERVAL
                for key in [k for k, c in self._entries.items() if c.exp <= t]:
                    del self._entries[key]
                while len(self._entries) >= self._max:
                    del self._entries[next(iter(self._entries))]
                self._by_subject = {}
                for key, known in self._entries.items():
                    self._by_subject.setdefault(known.sub, []).append(key)
            self._entries[token] = claims
            self._by_subject.setdefault(claims.sub, []).append(token)

    def forget_subject(self, subject: str) -> None:
        """Drop every cached token of ``subject``: a work item that reported its end has no
        further use for them. A late request with one is verified in full again, and the
        database refuses what no longer holds, as it always did."""
        with self._lock:
            for token in self._by_subject.pop(subject, ()):
                self._entries.pop(token, None)

    def __len__(self) -> int:
        return len(self._entries)
