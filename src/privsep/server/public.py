"""The server's public surface: the one module the ``runner`` command line may import.

The CLI turns configuration into a :class:`ServerSettings` and hands it over; everything behind
these names (the database models, the routes, the token checks, the scheduler's internals) may
change without the command line noticing. An import-linter contract holds the CLI to this
module, so a command that wants more of the server has to add it here, in the open.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from os import PathLike
from typing import Any, Protocol, TextIO

from privsep.server.admin import (
    AdminError,
    Principal,
    Revoked,
    list_operators,
    list_supervisors,
    register_operator,
    register_supervisor,
    revoke_operator,
    revoke_supervisor,
)
from privsep.server.listen import ListenError
from privsep.server.settings import ServerSettings
from privsep.server.signing_keys import check_signer, list_signing_keys, retire_signing_key

__all__ = [
    "AdminError",
    "ListenError",
    "Principal",
    "Revoked",
    "ServerSettings",
    "Stoppable",
    "check_signer",
    "create_app",
    "db_check",
    "db_upgrade",
    "list_operators",
    "list_signing_keys",
    "list_supervisors",
    "openapi_document",
    "prepare_metrics",
    "register_operator",
    "register_supervisor",
    "retire_signing_key",
    "revoke_operator",
    "revoke_supervisor",
    "serve",
    "sqlite_url_for",
    "start_scheduler",
]


class Stoppable(Protocol):
    """A background service the caller must stop before it exits."""

    def stop(self, timeout: float | None = None) -> None: ...


def sqlite_url_for(path: str | PathLike[str]) -> str:
    """The SQLAlchemy URL of a SQLite database file, in the mode the server expects."""
    from privsep.server.db.engine import sqlite_url_for as _sqlite_url_for

    return _sqlite_url_for(path)


def serve(settings: ServerSettings) -> int:
    """Serve the API until stopped; the pre-forked workers are this call's children."""
    from privsep.server.serve import serve as _serve

    return _serve(settings)


def create_app(settings: ServerSettings) -> object:
    """An ASGI app over ``settings``, for embedding and for reading the OpenAPI document."""
    from privsep.server.app import create_app as _create_app
    from privsep.server.state import build_state

    return _create_app(build_state(settings))


def openapi_document() -> dict[str, Any]:
    """The API's OpenAPI document, built offline from the app factory's routes: no database,
    no keys and no server needed."""
    from privsep.server.app import openapi_document as _openapi_document

    return _openapi_document()


@contextlib.contextmanager
def prepare_metrics(settings: ServerSettings) -> Iterator[None]:
    """Around everything that serves (the scheduler and the workers): with several workers,
    the shared metrics directory they all write to, removed afterwards. Enter it before
    anything imports ``prometheus_client`` (:func:`start_scheduler` does)."""
    from privsep.server.metrics_dir import prepare_multiprocess, remove_multiprocess

    directory = prepare_multiprocess(settings.workers)
    try:
        yield
    finally:
        remove_multiprocess(directory)


def start_scheduler(settings: ServerSettings) -> Stoppable:
    """One scheduler thread, started. The caller keeps one per process that serves (workers are
    forked after it starts and a thread does not survive a fork), and stops it on exit. Several
    servers may each run one: every write the scheduler makes is a conditional one."""
    from privsep.server.db.engine import Database
    from privsep.server.scheduler import LogRetention, SchedulerThread

    db = Database.from_url(settings.database_url)
    if settings.wakeups_broker:  # scheduled runs and repairs queue work too
        from privsep.server.wakeups import install

        install(db, settings.wakeups_broker)
    thread = SchedulerThread(
        db,
        settings.scheduler_interval,
        running_grace=settings.running_timeout_grace,
        log_retention=LogRetention(settings.log_retention_days, settings.log_retention_bytes),
    )
    thread.start()
    return thread


def db_upgrade(url: str, out: TextIO, err: TextIO) -> int:
    """Migrate the database to the newest schema (idempotent); the exit status to return."""
    from privsep.server.db.migrate import main_upgrade

    return main_upgrade(url, out, err)


def db_check(url: str, out: TextIO, err: TextIO) -> int:
    """Exit status 1 when the database is behind the code, 0 when it is current."""
    from privsep.server.db.migrate import main_check

    return main_check(url, out, err)
