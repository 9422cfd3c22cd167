"""A pool of uids, one per concurrent sandbox.

Two sandboxes that share a uid can signal each other, ptrace each other (were it not for
seccomp) and read each other's files; one uid each makes the kernel's ordinary permission checks
separate them. ``RLIMIT_NPROC`` then also becomes a per-sandbox limit, since it counts processes
per real uid.

Released uids go to the back of the queue, so the uid a sandbox just left is the last one handed
out again.
"""

from __future__ import annotations

import threading
from collections import deque


class UidPoolExhausted(RuntimeError):
    """Every uid of the pool is in use: the caller runs too many sandboxes at once."""


class UidPool:
    """Thread-safe allocator for ``count`` uids starting at ``first`` (gid = uid)."""

    def __init__(self, first: int, count: int) -> None:
        if first < 1000:
            raise ValueError(f"uid_first must be at least 1000 (got {first}): not a system uid")
        if count < 1:
            raise ValueError(f"uid_count must be at least 1 (got {count})")
        if first + count > 0xFFFF_FFFE:
            raise ValueError("uid pool runs past the largest valid uid")
        self.first = first
        self.count = count
        self._free: deque[int] = deque(range(first, first + count))
        self._used: set[int] = set()
        self._lock = threading.Lock()

    def acquire(self) -> int:
        """Take a uid no other live sandbox holds."""
        with self._lock:
            if not self._free:
                raise UidPoolExhausted(
                    f"all {self.count} sandbox uids ({self.first}..{self.first + self.count - 1})"
                    " are in use; raise sandbox.uid_count or run fewer sandboxes at once"
                )
            uid = self._free.popleft()
            self._used.add(uid)
            return uid

    def release(self, uid: int) -> None:
        """Give ``uid`` back. Call only once nothing runs as it any more."""
        with self._lock:
            if uid not in self._used:
                raise ValueError(f"uid {uid} is not held from this pool")
            self._used.remove(uid)
            self._free.append(uid)

    def in_use(self) -> frozenset[int]:
        """The uids currently held."""
        with self._lock:
            return frozenset(self._used)

    def __contains__(self, uid: object) -> bool:
        return isinstance(uid, int) and self.first <= uid < self.first + self.count
