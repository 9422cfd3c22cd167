"""Run the API on uvicorn, on TCP and the unix socket at once, with N pre-forked workers.

The sockets are bound once, in the parent, before any worker exists: workers inherit them and
accept from the same queue (the gunicorn model). Each worker builds its own database engine
and key state after the fork, so no connection or lock is shared across processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import time

import uvicorn

from privsep.server.app import create_app
from privsep.server.listen import tcp_socket, unix_socket
from privsep.server.reaper import ReaperThread
from privsep.server.settings import ServerSettings
from privsep.server.state import build_state

log = logging.getLogger("privsep.server")


def _run_worker(settings: ServerSettings, sockets: list[socket.socket]) -> None:
    state = build_state(settings)
    app = create_app(state)
    config = uvicorn.Config(
        app, log_level="warning", access_log=False, lifespan="off", timeout_graceful_shutdown=10
    )
    server = uvicorn.Server(config)
    reaper = ReaperThread(
        state.db,
        settings.supervisor_heartbeat_timeout,
        interval=max(1.0, settings.supervisor_heartbeat_timeout / 4),
    )
    reaper.start()
    try:
        asyncio.run(server.serve(sockets=sockets))
    finally:
        reaper.stop()
        state.db.dispose()


def open_sockets(settings: ServerSettings) -> list[socket.socket]:
    sockets = [tcp_socket(settings.bind)]
    if settings.socket_path:
        sockets.append(unix_socket(settings.socket_path))
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
    children: set[int] = set()
    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True
        for pid in list(children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for _ in range(settings.workers):
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            try:
                _run_worker(settings, sockets)
            finally:
                os._exit(0)
        children.add(pid)
    status = 0
    while children:
        try:
            pid, raw = os.waitpid(-1, 0)
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        children.discard(pid)
        code = os.waitstatus_to_exitcode(raw)
        if code != 0 and not stopping:
            log.error("server worker %d exited with status %d; stopping", pid, code)
            status = 1
            stop(signal.SIGTERM, None)
        time.sleep(0)
    return status
