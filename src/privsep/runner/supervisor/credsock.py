"""The supervisor's side of the per-sandbox credential socket.

Each sandbox gets a unix socket, ``<directory_root>/<sandbox_id>/cred.sock``, in a 0700
directory of its own, and asks it for its work item's short-lived token (``token``) or, with no
network, for an API call made on its behalf (``proxy``). The protocol and its framing live in
:mod:`privsep.client._wire`, shared with the child; this module is the server.

One :class:`CredentialServer` serves every sandbox from one selector loop, so 500 sandboxes
cost 500 listening sockets and no thread of their own. That loop is the sandbox backend's
reactor (:mod:`privsep.sandbox._reactor`), which already watches every sandbox's pipes and
deadlines: one loop in the supervisor, not two. Only the proxied HTTP call leaves it (a small
pool, :mod:`~privsep.runner.supervisor.credproxy`), so a slow API never stalls another
sandbox's token.

This module is the server's face: its lifecycle and the opening and closing of sockets. The
parts it is built from each have a module: the state table (``credtable``), one sandbox's
socket and token (``credentry``), the connections (``credconn``) and the proxied call
(``credproxy``).

Every connection goes through, in order:

1. **Capacity.** At most ``max_connections`` open connections per sandbox; the rest are closed
   at once, so one sandbox cannot exhaust the supervisor's file descriptors.
2. **Peer check**, before a byte is read (:mod:`privsep.runner.supervisor.peercheck`): the
   ``SO_PEERCRED`` uid must be the sandbox uid, and the pid must descend from the sandbox's root
   process, in a
   way a reused pid cannot fool. A connection made while the entry is WAITING (no process
   bound or no token set yet) is *parked*: not checked, not read, until both are there, so a
   child that connects while the supervisor is still between ``launch()`` and
   ``bind_process()``/``set_token()`` is answered with its token instead of turned away (and
   gets nothing before it has been checked). A failed check closes the connection, is logged at
   warning and counted; it is not a violation, because the peer is not the sandbox.
3. **Framing**, bounded: the 4-byte length is checked against ``MAX_FRAME`` before any payload
   is read, and payload bytes are read only up to the announced length.
4. **The state table**, OpenSSH's monitor style
   (:data:`~privsep.runner.supervisor.credtable.ALLOWED`). A request the current state
   does not allow, and any malformed, oversized, truncated or unknown frame, closes the
   connection and reports ``on_violation(sandbox_id, reason)``: across a trust boundary, a
   peer that speaks out of turn is hostile, and the supervisor kills the sandbox.

One request, one reply, in order; a connection may carry many exchanges. Each of these must
happen within ``idle_timeout`` or the connection is dropped (logged, counted, not a
violation): a parked connection being checked, a checked one sending its first request, any
frame being finished once started, any reply being read. Between exchanges a connection may
stay idle (the client SDK keeps one connection for its lifetime), bounded by the per-sandbox
cap.

The token is a secret: it is held in :class:`~privsep._token.Token`,
which no ``repr``, log line or exception message shows, and is revealed only where the reply
frame is built or the proxy handler called.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
from collections.abc import Callable
from dataclasses import asdict
from typing import Final

from privsep.runner.supervisor.credconn import Connections, Options, ViolationHandler
from privsep.runner.supervisor.credentry import SOCKET_NAME, SocketEntry, socket_place
from privsep.runner.supervisor.credproxy import DEFAULT_PROXY_WORKERS, ProxyHandler
from privsep.runner.supervisor.credtable import (
    ALLOWED,
    NO_TOKEN,
    Action,
    Counters,
    Rule,
    SandboxState,
)
from privsep.sandbox._reactor import Reactor

log = logging.getLogger("privsep.supervisor.credsock")

DEFAULT_IDLE_TIMEOUT: Final = 10.0
DEFAULT_MAX_CONNECTIONS: Final = 16
_CALL_WAIT = 10.0  # how long a close waits for the loop before giving up on it


class CredentialServer:
    """Serves every sandbox's credential socket from one selector loop.

    ``reactor`` is the loop to run on, shared with the sandbox backend; without one the server
    starts a reactor of its own and stops it on :meth:`close`. ``proxy_handler`` makes proxied
    API calls (``None``: ``proxy`` is answered with an error); ``on_violation`` is told when a
    sandbox breaks the protocol. ``idle_timeout`` bounds how long a connection may hold a
    descriptor without making progress (see the module doc); ``max_connections`` caps open
    connections per sandbox; ``proxy_workers`` sizes the pool that runs ``proxy_handler``.
    """

    def __init__(
        self,
        *,
        reactor: Reactor | None = None,
        proxy_handler: ProxyHandler | None = None,
        on_violation: ViolationHandler | None = None,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        proxy_workers: int = DEFAULT_PROXY_WORKERS,
        backlog: int = DEFAULT_MAX_CONNECTIONS,
    ) -> None:
        if idle_timeout <= 0 or max_connections < 1 or proxy_workers < 1 or backlog < 1:
            raise ValueError("idle_timeout, max_connections, proxy_workers, backlog must be > 0")
        self.idle_timeout = idle_timeout
        self.max_connections = max_connections
        self._backlog = backlog
        self._entries: dict[str, SocketEntry] = {}
        self._reserved: set[str] = set()
        self._lock = threading.Lock()
        self._reactor = reactor
        self._own_reactor = reactor is None
        self._conns: Connections | None = None
        self._options = Options(
            proxy_handler, on_violation, idle_timeout, max_connections, proxy_workers
        )
        self._closed = False

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        """Start serving (a reactor of its own, if none was given). Idempotent;
        :meth:`open_socket` calls it too."""
        with self._lock:
            if self._closed:
                raise RuntimeError("the credential server is closed")
            if self._conns is not None:
                return
            if self._reactor is None:
                self._reactor = Reactor(name="privsep-credsock")
            self._conns = Connections(self._reactor, self._options)

    def close(self) -> None:
        """Stop serving: every socket and connection is closed and every socket directory
        removed. In-flight proxied calls are abandoned (their replies are dropped)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            ids = list(self._entries)
        for sandbox_id in ids:
            self.close_socket(sandbox_id)
        if self._conns is not None:
            self._conns.shutdown()
        if self._own_reactor and self._reactor is not None:
            self._reactor.stop()

    stop = close

    def __enter__(self) -> CredentialServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- sockets --------------------------------------------------------------------------------

    def open_socket(
        self,
        sandbox_id: str,
        *,
        directory_root: str,
        uid: int | None = None,
        gid: int | None = None,
    ) -> SocketEntry:
        """Create ``<directory_root>/<sandbox_id>/cred.sock`` and start listening on it.

        The directory is created 0700 and stays ours while the socket is bound and set to
        0600, then both are handed to ``uid``/``gid`` (if given here; else at
        :meth:`SocketEntry.bind_process`).
        """
        place = socket_place(directory_root, sandbox_id)
        self.start()
        with self._lock:
            if self._closed:
                raise RuntimeError("the credential server is closed")
            if sandbox_id in self._entries or sandbox_id in self._reserved:
                raise ValueError(f"sandbox {sandbox_id} already has a credential socket")
            # Reserve the id while the filesystem work runs without the lock.
            self._reserved.add(sandbox_id)
        try:
            entry = SocketEntry.listen(
                self._wake_entry, sandbox_id, place, backlog=self._backlog, uid=uid, gid=gid
            )
        finally:
            with self._lock:
                self._reserved.discard(sandbox_id)
        with self._lock:
            self._entries[sandbox_id] = entry
        conns = self._connections()
        self._post(lambda: conns.listen(entry))
        log.debug("credential socket %s: listening on %s", sandbox_id, entry.path)
        return entry

    def close_socket(self, sandbox_id: str) -> None:
        """Close the sandbox's socket and connections, forget its token, and remove the
        socket and its directory. Unknown ids are ignored (idempotent)."""
        with self._lock:
            entry = self._entries.get(sandbox_id)
            if entry is None:
                return
            del self._entries[sandbox_id]
        with entry._lock:
            entry._closed = True
            entry._state = SandboxState.ENDED
            entry._token = None
        conns = self._connections()
        self._call_in_loop(lambda: conns.drop(entry))
        with contextlib.suppress(FileNotFoundError):
            os.unlink(entry.path)
        # The sandbox uid owns the directory and may have left things in it; rmtree works
        # through directory fds and does not follow symlinks.
        shutil.rmtree(entry.directory, ignore_errors=True)
        log.debug("credential socket %s: closed", sandbox_id)

    def entry(self, sandbox_id: str) -> SocketEntry | None:
        with self._lock:
            return self._entries.get(sandbox_id)

    def stats(self) -> dict[str, int]:
        """Totals over every socket this server has served, plus what is open now."""
        out = asdict(self._conns.totals if self._conns is not None else Counters())
        with self._lock:
            entries = list(self._entries.values())
        out["open_sockets"] = len(entries)
        out["open_connections"] = sum(len(e._conns) for e in entries)
        return out

    # -- cross-thread plumbing ------------------------------------------------------------------

    def _connections(self) -> Connections:
        conns = self._conns
        if conns is None:
            raise RuntimeError("the credential server was never started")
        return conns

    def _post(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the loop thread soon (dropped once the loop has stopped)."""
        assert self._reactor is not None  # noqa: S101 - set by start()
        with contextlib.suppress(RuntimeError):
            self._reactor.call_soon(fn)

    def _call_in_loop(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the loop thread and wait for it (inline if we are that thread, or
        if the loop is not running)."""
        reactor = self._reactor
        if reactor is None or reactor.in_reactor_thread or not reactor.running:
            fn()
            return
        done = threading.Event()

        def run() -> None:
            try:
                fn()
            finally:
                done.set()

        try:
            reactor.call_soon(run)
        except RuntimeError:  # stopped meanwhile: nobody else touches its sockets now
            fn()
            return
        if not done.wait(timeout=_CALL_WAIT) and reactor.running:
            log.error("credential server: the loop did not answer within %g s", _CALL_WAIT)

    def _wake_entry(self, entry: SocketEntry) -> None:
        conns = self._connections()
        self._post(lambda: conns.recheck_parked(entry))


__all__ = [
    "ALLOWED",
    "NO_TOKEN",
    "SOCKET_NAME",
    "Action",
    "Counters",
    "CredentialServer",
    "ProxyHandler",
    "Rule",
    "SandboxState",
    "SocketEntry",
    "ViolationHandler",
]
