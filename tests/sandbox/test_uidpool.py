"""The uid pool: one uid per live sandbox, under any amount of concurrency."""

from __future__ import annotations

import threading

import pytest

from privsep.sandbox import UidPool, UidPoolExhausted


def test_no_uid_is_handed_out_twice_under_contention() -> None:
    pool = UidPool(300_000, 50)
    held: list[int] = []
    lock = threading.Lock()
    barrier = threading.Barrier(10)

    def worker() -> None:
        barrier.wait()
        for _ in range(5):
            uid = pool.acquire()
            with lock:
                held.append(uid)

    threads = [threading.Thread(target=worker) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(held) == list(range(300_000, 300_050))
    assert pool.in_use() == frozenset(held)


def test_exhaustion_says_what_to_change() -> None:
    pool = UidPool(300_000, 1)
    pool.acquire()
    with pytest.raises(UidPoolExhausted, match=r"raise sandbox\.uid_count"):
        pool.acquire()


def test_released_uid_goes_to_the_back() -> None:
    pool = UidPool(300_000, 3)
    first = pool.acquire()
    pool.release(first)
    assert [pool.acquire(), pool.acquire(), pool.acquire()] == [300_001, 300_002, 300_000]


def test_releasing_a_uid_not_held_is_an_error() -> None:
    pool = UidPool(300_000, 3)
    with pytest.raises(ValueError, match="is not held"):
        pool.release(300_001)


def test_system_uids_are_refused() -> None:
    with pytest.raises(ValueError, match="not a system uid"):
        UidPool(0, 10)
