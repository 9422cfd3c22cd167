"""The verified-token cache holds about one token lifetime's worth, not everything until full.

Expired entries used to be dropped only once the cache reached its cap (50,000): a server that
hands out thousands of tokens a minute grew by megabytes a minute for hours, holding tokens long
dead (the soak in benchmarks/bench_soak.py showed it).
"""

from __future__ import annotations

from privsep.secrets.tokens import Claims
from privsep.server.token_cache import SWEEP_INTERVAL, VerifiedTokenCache

T0 = 1_800_000_000.0


def _claims(n: int, exp: float) -> Claims:
    return Claims(
        iss="privsep",
        aud="aud",
        sub=f"attempt-{n}",
        scope="task",
        iat=int(T0),
        nbf=int(T0),
        exp=int(exp),
        jti=f"jti-{n}",
        kid="kid",
    )


def test_expired_tokens_leave_the_cache_long_before_it_is_full() -> None:
    cache = VerifiedTokenCache(max_entries=50_000)
    for n in range(1000):  # a minute's tokens, living 600 s
        cache.put(f"token-{n}", _claims(n, T0 + 600), now=T0 + n * 0.06)
    assert len(cache) == 1000
    later = T0 + 600 + SWEEP_INTERVAL + 1  # all of them have expired
    cache.put("fresh", _claims(10_000, later + 600), now=later)
    assert len(cache) == 1
    assert cache.get("fresh", frozenset({"task"}), {"kid"}, now=later) is not None


def test_the_cap_still_holds_when_nothing_has_expired() -> None:
    cache = VerifiedTokenCache(max_entries=100)
    for n in range(250):
        cache.put(f"token-{n}", _claims(n, T0 + 600), now=T0)
    assert len(cache) == 100
    assert cache.get("token-249", frozenset({"task"}), {"kid"}, now=T0) is not None
