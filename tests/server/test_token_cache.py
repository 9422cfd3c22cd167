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


def test_a_subjects_tokens_go_when_it_is_forgotten_and_others_stay() -> None:
    cache = VerifiedTokenCache(max_entries=1000)
    cache.put("token-a1", _claims(1, T0 + 600), now=T0)
    cache.put("token-a2", _claims(1, T0 + 600), now=T0)  # the same attempt, refreshed
    cache.put("token-b", _claims(2, T0 + 600), now=T0)
    cache.forget_subject("attempt-1")
    assert len(cache) == 1
    assert cache.get("token-a1", frozenset({"task"}), {"kid"}, now=T0) is None
    assert cache.get("token-b", frozenset({"task"}), {"kid"}, now=T0) is not None
    cache.forget_subject("attempt-1")  # again, or a subject never seen: nothing happens
    cache.forget_subject("nobody")
    assert len(cache) == 1


def test_the_subject_index_survives_evictions_and_sweeps() -> None:
    cache = VerifiedTokenCache(max_entries=10)
    for n in range(25):  # evictions for room leave stale names in the index
        cache.put(f"token-{n}", _claims(n, T0 + 600), now=T0 + n)
    later = T0 + SWEEP_INTERVAL + 30
    cache.put("token-25", _claims(25, T0 + 600), now=later)  # a sweep rebuilds the index
    cache.forget_subject("attempt-24")
    cache.forget_subject("attempt-3")  # evicted long ago
    assert cache.get("token-24", frozenset({"task"}), {"kid"}, now=later) is None
    assert cache.get("token-25", frozenset({"task"}), {"kid"}, now=later) is not None
    assert len(cache) == 9
