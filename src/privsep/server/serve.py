"""Run the API on uvicorn, on TCP and the unix socket at once, with N worker processes.

The sockets are bound once, in the parent, before any worker exists: workers inherit them and
accept from the same queue (the gunicorn model); the parent itself never accepts. Workers are
fresh interpreters (spawned, not forked) that inherit only the listening sockets, the shared
load array below and their settings (through a pipe, never argv or the environment). A
forked worker would inherit the parent's threads' locks in whatever state the fork caught them:
``runner server`` runs the scheduler thread in the parent, and a worker forked while that
thread was inside SQLite hung forever in its first ``sqlite3.connect`` (about one start in two
with two workers). Each worker builds its own database engine and key state, so no connection
or lock is shared across processes.

How connections are spread over the workers: supervisors and tasks keep their connections
open, so whichever worker accepts a connection serves it for its whole life. An event loop
that finds its listening socket readable accepts every pending connection at once, so a burst
of connects lands on whichever worker woke first (16 clients were seen split 16+0 and 14+2).
Instead, each worker accepts in a thread of its own that blocks in ``accept()`` (the kernel
hands a new connection to the acceptor that has waited longest, for TCP and unix sockets
alike), and the workers publish how many connections each holds in a small shared array
(:class:`WorkerLoads`): a worker that holds more connections than the least loaded one
stops accepting until that is no longer so. The thread hands each socket to the worker's
event loop; nothing changes per request. (SO_REUSEPORT would spread only TCP, by a hash that
is uneven for a few long-lived connections, and cannot share one unix socket path.)
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import gc
import json
import logging
import mmap
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import uvicorn

from privsep.server.app import serving_app
from privsep.server.listen import LISTEN_BACKLOG, tcp_socket, unix_socket
from privsep.server.reaper import ReaperThread
from privsep.server.settings import ServerSettings
from privsep.server.state import build_state

log = logging.getLogger("privsep.server")


def _run_worker(
    settings: ServerSettings,
    sockets: list[socket.socket],
    loads: WorkerLoads | None = None,
    index: int = 0,
    parent: int | None = None,
) -> None:
    state = build_state(settings)
    app = serving_app(state)
    config = uvicorn.Config(
        app,
        # uvloop and httptools when installed (the server extra installs both): several times
        # less CPU per request than asyncio's loop and h11.
        loop="auto",
        http="auto",
        log_level="warning",
        access_log=False,
        lifespan="off",
        timeout_graceful_shutdown=10,
    )
    server = BalancedServer(config, sockets, loads, index, parent)
    reaper = ReaperThread(
        state.db,
        settings.supervisor_heartbeat_timeout,
        interval=max(1.0, settings.supervisor_heartbeat_timeout / 4),
    )
    reaper.start()
    # Everything built so far (modules, the app, the state) lives as long as the worker. Kept
    # out of the collector's sight, a full collection costs nothing instead of ~80 ms of
    # scanning ~130,000 objects with every request of the worker waiting.
    gc.collect()
    gc.freeze()
    try:
        server.run()  # on the loop the config chose
    finally:
        reaper.stop()
        state.db.dispose()


# accept() errors that concern one connection, or a passing shortage: keep accepting.
_TRANSIENT_ACCEPT_ERRORS = frozenset(
    {
        errno.ECONNABORTED,
        errno.EPROTO,
        errno.EPERM,
        errno.EINTR,
        errno.EMFILE,
        errno.ENFILE,
        errno.ENOBUFS,
        errno.ENOMEM,
    }
)


class WorkerLoads:
    """How many connections each worker holds, in a small shared memory file (``memfd``)
    that the workers inherit.

    Each worker writes only its own slot; reading the others' is a heuristic, so a torn or
    stale value costs balance, never correctness."""

    # The count of a worker that is not accepting (yet, or any more): never the least loaded.
    ABSENT = 1 << 62

    def __init__(self, workers: int, fd: int | None = None) -> None:
        """A new array for ``workers`` workers, or (``fd``) the one a parent created."""
        size = 8 * workers
        fresh = fd is None
        if fd is None:
            fd = os.memfd_create("privsep-worker-loads")
            os.ftruncate(fd, size)
        self.fd = fd
        self.workers = workers
        self._memory = mmap.mmap(fd, size)  # MAP_SHARED: every worker sees every write
        self._slots = memoryview(self._memory).cast("q")
        if fresh:
            for index in range(workers):
                self._slots[index] = self.ABSENT

    def publish(self, index: int, connections: int) -> None:
        self._slots[index] = connections

    def may_accept(self, index: int, connections: int) -> bool:
        """Whether a worker holding ``connections`` should take the next one: only the least
        loaded workers do. (One that passed this check and waits in ``accept()`` may still get
        one more during a burst, so counts stay within two of each other.)"""
        self._slots[index] = connections
        others = [n for i, n in enumerate(self._slots) if i != index]
        return not others or connections <= min(others)


# How long an acceptor that is ahead of the others waits before it looks again (doubling from
# the first to the second value while it stays ahead).
_BACKOFF_S = (0.001, 0.02)


class BalancedServer(uvicorn.Server):
    """uvicorn's server on inherited listening sockets, accepting through blocking
    ``accept()`` threads that keep the workers' connection counts even (see the module
    docstring). Requests are served by uvicorn's own protocol on the event loop, as usual."""

    def __init__(
        self,
        config: uvicorn.Config,
        listeners: list[socket.socket],
        loads: WorkerLoads | None = None,
        index: int = 0,
        parent: int | None = None,
    ) -> None:
        super().__init__(config)
        self.listeners = listeners
        self.loads = loads
        self.index = index
        self.parent = parent  # a spawned worker's main process: it must not outlive it
        self._pending: set[asyncio.Future[Any]] = set()
        self._handing_over = 0  # accepted, not yet counted in server_state.connections
        self._count_lock = threading.Lock()

    def connections(self) -> int:
        return len(self.server_state.connections) + self._handing_over

    async def on_tick(self, counter: int) -> bool:
        if self.loads is not None and not self.should_exit:  # closed connections lower it
            self.loads.publish(self.index, self.connections())
        if self.parent is not None and not self.should_exit and os.getppid() != self.parent:
            # The main process is gone (SIGKILL, the OOM killer): nobody would restart or stop
            # this worker, and it would keep the port and the socket from a new server. As
            # gunicorn's workers do, notice the new parent at the next tick and wind down.
            log.warning("the server's main process (pid %d) is gone: worker stopping", self.parent)
            self.should_exit = True
        return await super().on_tick(counter)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=[])  # uvicorn listens on nothing itself
        loop = asyncio.get_running_loop()
        config = self.config

        def protocol() -> asyncio.Protocol:
            made: asyncio.Protocol = config.http_protocol_class(  # type: ignore[call-arg]
                config=config,
                server_state=self.server_state,
                app_state=self.lifespan.state,
                _loop=loop,
            )
            return made

        for sock in self.listeners:
            sock.listen(LISTEN_BACKLOG)  # the first ready worker opens the door (see open_sockets)
            threading.Thread(
                target=self._accept_forever,
                args=(sock, loop, protocol),
                name=f"privsep-accept-{sock.family.name}",
                daemon=True,  # blocked in accept() until the process exits
            ).start()

    def _accept_forever(
        self,
        sock: socket.socket,
        loop: asyncio.AbstractEventLoop,
        protocol: Callable[[], asyncio.Protocol],
    ) -> None:
        sock.setblocking(True)
        try:
            self._accept_until_exit(sock, loop, protocol)
        finally:
            if self.loads is not None:
                self.loads.publish(self.index, WorkerLoads.ABSENT)

    def _accept_until_exit(
        self,
        sock: socket.socket,
        loop: asyncio.AbstractEventLoop,
        protocol: Callable[[], asyncio.Protocol],
    ) -> None:
        backoff = _BACKOFF_S[0]
        while not self.should_exit:
            if self.loads is not None and not self.loads.may_accept(self.index, self.connections()):
                time.sleep(backoff)  # the least loaded worker is blocked in accept(): it takes it
                backoff = min(backoff * 2, _BACKOFF_S[1])
                continue
            backoff = _BACKOFF_S[0]
            try:
                conn, _ = sock.accept()
            except OSError as exc:
                if exc.errno in _TRANSIENT_ACCEPT_ERRORS:
                    if exc.errno not in (errno.ECONNABORTED, errno.EPROTO, errno.EINTR):
                        log.warning("accept() on %s failed: %s; retrying", sock, exc)
                        time.sleep(0.1)
                    continue
                log.error("accept() on %s failed: %s; no longer accepting there", sock, exc)
                return
            if self.should_exit:
                conn.close()
                return
            with self._count_lock:
                self._handing_over += 1
            try:
                loop.call_soon_threadsafe(self._serve_connection, conn, protocol)
            except RuntimeError:  # the loop is closed: the worker is gone
                conn.close()
                return

    def _serve_connection(
        self, conn: socket.socket, protocol: Callable[[], asyncio.Protocol]
    ) -> None:
        if self.should_exit:
            self._handed_over()
            conn.close()
            return
        conn.setblocking(False)
        if conn.family != socket.AF_UNIX:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        loop = asyncio.get_running_loop()
        future = asyncio.ensure_future(loop.connect_accepted_socket(protocol, conn))
        self._pending.add(future)
        future.add_done_callback(self._connected)

    def _handed_over(self) -> None:
        with self._count_lock:
            self._handing_over -= 1

    def _connected(self, future: asyncio.Future[Any]) -> None:
        self._handed_over()  # counted in server_state.connections from now on (or failed)
        self._pending.discard(future)
        if not future.cancelled() and future.exception() is not None:
            log.warning("could not start serving a connection: %s", future.exception())


def open_sockets(settings: ServerSettings) -> list[socket.socket]:
    """Bound, not yet listening: each worker calls ``listen()`` once it can serve, so until
    the first worker is ready a client is refused (and retries) instead of waiting in a queue
    that nobody takes from."""
    sockets = [tcp_socket(settings.bind, listen=False)]
    if settings.socket_path:
        sockets.append(unix_socket(settings.socket_path, listen=False))
    return sockets


def serve(settings: ServerSettings, *, ready: str = "") -> int:
    """Serve until SIGTERM or SIGINT. Returns the exit status for the CLI."""
    sockets = open_sockets(settings)
    where = settings.bind + (f" and {settings.socket_path}" if settings.socket_path else "")
    print(
        f"privsep server listening on {where} ({settings.workers} worker"
        f"{'s' if settings.workers != 1 else ''})",
        file=sys.stderr,
        flush=True,
    )
    if ready:
        with open(ready, "w") as fh:
            fh.write(str(os.getpid()))
    if settings.workers <= 1:
        _run_worker(settings, sockets)
        return 0
    return _prefork(settings, sockets)


def _prefork(settings: ServerSettings, sockets: list[socket.socket]) -> int:
    children: dict[int, subprocess.Popen[bytes]] = {}
    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True
        for pid in list(children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    loads = WorkerLoads(settings.workers)
    try:
        for index in range(settings.workers):
            proc = _spawn_worker(settings, sockets, loads, index)
            children[proc.pid] = proc
    except BaseException:
        stop(signal.SIGTERM, None)
        raise
    status = 0
    while children:
        try:
            pid, raw = os.waitpid(-1, 0)
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        if pid not in children:
            continue
        proc = children.pop(pid)
        code = os.waitstatus_to_exitcode(raw)
        proc.returncode = code  # reaped here, not by Popen.wait
        if code != 0 and not stopping:
            log.error("server worker %d exited with status %d; stopping", pid, code)
            status = 1
            stop(signal.SIGTERM, None)
        time.sleep(0)
    return status


_WORKER_CODE = "from privsep.server.serve import worker_main; worker_main()"


def _spawn_worker(
    settings: ServerSettings, sockets: list[socket.socket], loads: WorkerLoads, index: int
) -> subprocess.Popen[bytes]:
    """Start worker ``index``: this interpreter, afresh, with the listening sockets and the
    load array as inherited descriptors, and its settings (secrets included) on a pipe."""
    fds = [sock.fileno() for sock in sockets]
    spec = {
        "settings": dataclasses.asdict(settings),
        "sockets": fds,
        "loads": [loads.fd, loads.workers],
        "index": index,
        "parent": os.getpid(),
    }
    proc = subprocess.Popen(
        # -P: the working directory does not go on sys.path (a stray privsep/ or fastapi.py
        # there must not be imported by the server).
        [sys.executable, "-P", "-c", _WORKER_CODE],
        stdin=subprocess.PIPE,
        pass_fds=[*fds, loads.fd],
    )
    assert proc.stdin is not None  # noqa: S101 - stdin=PIPE
    with proc.stdin:
        proc.stdin.write(json.dumps(spec).encode())
    return proc


def worker_main() -> None:
    """A spawned worker's entry point (see :func:`_spawn_worker`)."""
    spec = json.loads(sys.stdin.buffer.read())
    with open(os.devnull, "rb") as devnull:  # the pipe is done with; keep fd 0 harmless
        os.dup2(devnull.fileno(), 0)
    values: dict[str, Any] = {
        k: tuple(v) if isinstance(v, list) else v for k, v in spec["settings"].items()
    }
    settings = ServerSettings(**values)
    sockets = [socket.socket(fileno=fd) for fd in spec["sockets"]]
    fd, workers = spec["loads"]
    _run_worker(settings, sockets, WorkerLoads(workers, fd), spec["index"], spec["parent"])
