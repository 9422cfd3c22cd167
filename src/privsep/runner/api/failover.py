"""Several server URLs behind one client: a replica that stops answering is left for the next.

Replicas share the database and the signing keys, so a session or a work token that one of
them issued is honoured by all of them: on failover only the address changes, never the
credentials. A load balancer in front of the replicas is one URL, and this client then does
nothing a single :class:`~privsep.runner.api.keepalive.KeepAliveClient` would not.

Which failures move to the next URL, and which request is sent again there:

=====================================  ==============================================
failure on the current URL             what happens
=====================================  ==============================================
no connection (refused, unreachable,   the server never saw the request: it goes to
connect timeout), or writing it failed the next URL at once, whatever its method
503                                    the server (or a balancer with no healthy
                                       replica) did not act: next URL, any method
connection lost after the request      the server may have acted: a GET or HEAD goes
left, or 502 / 504 (a gateway lost     to the next URL; any other method is returned
the answer)                            as it failed, and its caller decides (an
                                       outcome is kept and sent again, a claim waits
                                       for the next pass)
=====================================  ==============================================

In every case the next request starts at the next URL, and a URL that answers stays the
current one, so a healthy replica keeps the kept connections. One request tries each URL at
most once; when all failed, the last answer is returned (a 503 says more than a refusal), or
the last :class:`HttpUnavailable` is raised.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any, Final

from privsep.runner.api.keepalive import HttpReply, HttpUnavailable, KeepAliveClient

log = logging.getLogger("privsep.api")

# Methods whose repetition changes nothing on the server (RFC 9110 9.2.2, the ones we use).
IDEMPOTENT: Final = frozenset({"GET", "HEAD"})
# Answers from a replica, or from a gateway in front of it, that say "try another".
FAILOVER_STATUSES: Final = frozenset({502, 503, 504})
# Of those, the ones that promise nothing was done.
NOT_ACTED: Final = frozenset({503})

__all__ = ["FAILOVER_STATUSES", "IDEMPOTENT", "FailoverClient"]


class FailoverClient:
    """Calls the first URL that answers, of ``urls`` in order. Thread-safe.

    ``unix_socket`` is a server on this host: it is the one way there, so it takes the first
    URL alone (for the Host header and path prefix) and fails over nowhere.
    """

    def __init__(
        self, urls: str | Sequence[str], *, timeout: float = 10.0, unix_socket: str | None = None
    ) -> None:
        given = (urls,) if isinstance(urls, str) else tuple(urls)
        if not given:
            raise ValueError("no server URL given")
        if unix_socket:
            given = given[:1]
        self._clients = tuple(
            KeepAliveClient(url, timeout=timeout, unix_socket=unix_socket) for url in given
        )
        self.timeout = timeout
        self._lock = threading.Lock()
        self._current = 0

    def __repr__(self) -> str:
        return f"FailoverClient({[c.base_url for c in self._clients]!r})"

    @property
    def urls(self) -> tuple[str, ...]:
        return tuple(c.base_url for c in self._clients)

    @property
    def base_url(self) -> str:
        """The URL requests go to now."""
        return self._clients[self._current].base_url

    def request(
        self, method: str, path: str, body: Any = None, *, token: str | None = None
    ) -> HttpReply:
        """As :meth:`KeepAliveClient.request`, moving to the next URL as the module says."""
        start = self._current
        count = len(self._clients)
        reply: HttpReply | None = None
        failure: HttpUnavailable | None = None
        for step in range(count):
            index = (start + step) % count
            try:
                reply = self._clients[index].request(method, path, body, token=token)
            except HttpUnavailable as exc:
                self._leave(index, exc.reason)
                if exc.sent and method not in IDEMPOTENT:
                    raise
                failure = exc
                continue
            if count == 1 or reply.status not in FAILOVER_STATUSES:
                return reply
            self._leave(index, f"HTTP {reply.status}")
            if reply.status not in NOT_ACTED and method not in IDEMPOTENT:
                return reply
        if reply is not None:
            return reply
        assert failure is not None  # noqa: S101 - the loop ran at least once and did not return
        raise failure

    def _leave(self, index: int, why: str) -> None:
        """Make the URL after ``index`` the current one, unless another thread already moved
        on (two threads failing on one replica must not skip the next)."""
        count = len(self._clients)
        if count == 1:
            return
        with self._lock:
            if self._current != index:
                return
            self._current = (index + 1) % count
        log.warning(
            "server %s unavailable (%s); switching to %s",
            self._clients[index].base_url,
            why,
            self._clients[(index + 1) % count].base_url,
        )

    def close(self) -> None:
        """Close every URL's connections; later requests raise :class:`HttpUnavailable`."""
        for client in self._clients:
            client.close()
