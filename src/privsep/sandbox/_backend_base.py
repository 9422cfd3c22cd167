"""The bookkeeping every backend keeps of the sandboxes it launched.

A backend must know which of its sandboxes still run (to list them, and to end them all when
it closes), refuse launches once it is closing, and be usable as a context manager. None of that
depends on how a sandbox is isolated, so it is written once here and the backends differ only
in launching and in what else they stop at close.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Generic, Self, TypeVar

from privsep.sandbox._reactor import Reactor
from privsep.sandbox._reactor_handle import ReactorHandle
from privsep.sandbox.errors import SandboxLaunchError

H = TypeVar("H", bound=ReactorHandle)


class BackendBase(ABC, Generic[H]):
    """Live handles, the closed flag and the lock that guards both (a backend may guard more
    of its own state with it). ``reactor`` is the thread that watches every sandbox."""

    def __init__(self, reactor: Reactor) -> None:
        self._reactor = reactor
        self._handles: set[H] = set()
        self._lock = threading.Lock()
        self._closed = False

    def running(self) -> list[H]:
        """Handles of sandboxes not yet finished."""
        with self._lock:
            return list(self._handles)

    def _ensure_open(self) -> None:
        with self._lock:
            if self._closed:
                raise SandboxLaunchError("the sandbox backend is closed")

    def _watch(self, handle: H) -> H:
        """A sandbox just started: count it as running and let the reactor watch it."""
        with self._lock:
            self._handles.add(handle)
        self._reactor.call_soon(handle._attach)
        return handle

    def _forget(self, handle: H) -> None:
        with self._lock:
            self._handles.discard(handle)

    def _mark_closed(self) -> list[H] | None:
        """Refuse launches from now on; the sandboxes still running, or ``None`` if the
        backend was already closed."""
        with self._lock:
            if self._closed:
                return None
            self._closed = True
            return list(self._handles)

    @staticmethod
    def _end_all(handles: Sequence[H], grace: float, wait: float) -> None:
        """Kill them all at once, then wait up to ``wait`` s for each to be reaped."""
        for handle in handles:
            handle.kill(grace=grace)
        for handle in handles:
            handle.wait(timeout=wait)

    @abstractmethod
    def close(self, grace: float = 1.0) -> None:
        """Kill every running sandbox, wait for them, and stop what the backend runs."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
