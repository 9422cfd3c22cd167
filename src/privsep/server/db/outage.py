"""When the database is away: which errors mean it, and one log line per incident.

A PostgreSQL restart, a failover or a full disk makes every request and every background pass
fail at once. Each of them used to log its own traceback ("Exception in ASGI application",
"scheduling runs failed"): seventeen of them for one restart, while the clients got 500s that
told them nothing. Now:

* :func:`unavailable` says whether an exception means "the database cannot be used right
  now" (a connection refused or lost, a server shutting down or starting up, too many
  connections, a locked SQLite file), as opposed to a bug or a refusal, which keep their
  traceback. A deadlock or a serialization failure is not an outage either.
* Every caller that meets one (a route, the fast path, the scheduler, the reaper) reports it
  to the :class:`Incidents` of its database, and the routes answer **503** with
  ``Retry-After`` (:data:`RETRY_AFTER_S`).
* :class:`Incidents` logs one warning when an incident starts and one when the database
  answers again, with how long it lasted and how many failures it absorbed. It is per process
  and database URL, shared by the API and the scheduler of one process; a server with several
  workers logs once per worker.
* When an incident starts, every connection pool of that database in the process is dropped:
  a pooled connection from before the outage is dead, and would otherwise fail once more
  after the database is back.

Recovery needs nothing from anyone: the next request or pass opens new connections, and its
success ends the incident.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable
from typing import Final

from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL

log = logging.getLogger("privsep.server.database")

RETRY_AFTER_S: Final = 5
"""The ``Retry-After`` of a 503 during an outage: long enough not to hammer a database that
is restarting, short enough that work resumes within seconds of it coming back."""

_CONNECTION_TYPES: tuple[type[BaseException], ...] = (
    sa_exc.OperationalError,
    sa_exc.InterfaceError,
    sa_exc.DisconnectionError,
    sa_exc.TimeoutError,  # no pooled connection came free: the database is not keeping up
    sqlite3.OperationalError,
    sqlite3.InterfaceError,
)
try:  # the read pool talks to psycopg directly, so its errors arrive unwrapped
    import psycopg

    _CONNECTION_TYPES += (psycopg.OperationalError, psycopg.InterfaceError)
except ImportError:  # a SQLite-only installation
    pass

# SQLSTATE classes of OperationalError that are about one transaction, not the database:
# 40 (deadlock, serialization failure) and 55 (lock not available). They keep their 500.
_NOT_AN_OUTAGE: Final = ("40", "55")


# SQLite's OperationalError also means "no such table" and other mistakes (SQLITE_ERROR); only
# these primary codes say the file cannot be used right now.
_SQLITE_OUTAGES: Final = (
    "SQLITE_BUSY",
    "SQLITE_LOCKED",
    "SQLITE_IOERR",
    "SQLITE_FULL",
    "SQLITE_CANTOPEN",
    "SQLITE_PROTOCOL",
)


def unavailable(exc: BaseException) -> bool:
    """True when ``exc`` means the database cannot be used right now (see the module
    docstring); False for everything else, which must keep failing loudly."""
    if isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated:
        return True
    if not isinstance(exc, _CONNECTION_TYPES):
        return False
    orig = getattr(exc, "orig", None) or exc
    if isinstance(orig, sqlite3.Error):
        return str(getattr(orig, "sqlite_errorname", "")).startswith(_SQLITE_OUTAGES)
    return not str(getattr(orig, "sqlstate", None) or "").startswith(_NOT_AN_OUTAGE)


def reason_of(exc: BaseException) -> str:
    """The driver's first line about ``exc``, short: never the SQL or its parameters (which
    SQLAlchemy's own message carries), never a URL's password (drivers do not print it)."""
    orig = getattr(exc, "orig", None) or exc
    text = str(orig).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(orig).__name__}: {first[:200]}" if first else type(orig).__name__


class Incidents:
    """The outage state of one database in this process; thread-safe. ``failed`` on every
    failure that :func:`unavailable` recognises, ``ok`` after any success (cheap when there
    is no incident: one attribute read)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._lock = threading.Lock()
        self._since: float | None = None
        self._failures = 0
        self._on_start: list[weakref.WeakMethod[Callable[[], None]]] = []

    @property
    def active(self) -> bool:
        return self._since is not None

    def on_start(self, callback: Callable[[], None]) -> None:
        """Call the bound method ``callback`` when an incident starts (held weakly: a pool
        that is gone is not kept alive by its registration)."""
        with self._lock:
            self._on_start.append(weakref.WeakMethod(callback))

    def failed(self, exc: BaseException, where: str) -> None:
        """Count one failure; the first of an incident logs the one line and drops pools."""
        with self._lock:
            self._failures += 1
            if self._since is not None:
                return
            self._since = time.monotonic()
            self._failures = 1
            callbacks = [ref() for ref in self._on_start]
            self._on_start = [ref for ref in self._on_start if ref() is not None]
        log.warning(
            "database %s is unavailable (%s, in %s): answering 503 with Retry-After %d s "
            "until it answers again",
            self.name,
            reason_of(exc),
            where,
            RETRY_AFTER_S,
        )
        for callback in callbacks:
            if callback is not None:
                callback()

    def ok(self) -> None:
        """A statement succeeded: the incident, if any, is over."""
        if self._since is None:
            return
        with self._lock:
            since, failures = self._since, self._failures
            if since is None:
                return
            self._since = None
            self._failures = 0
        log.warning(
            "database %s answers again after %.1f s; %d requests and passes failed meanwhile",
            self.name,
            time.monotonic() - since,
            failures,
        )


_registry: dict[str, Incidents] = {}
_registry_lock = threading.Lock()


def incidents_for(url: URL) -> Incidents:
    """The one :class:`Incidents` of this database in this process."""
    name = url.render_as_string(hide_password=True)
    with _registry_lock:
        found = _registry.get(name)
        if found is None:
            found = _registry[name] = Incidents(name)
        return found


def pass_failed(
    logger: logging.Logger, incidents: Incidents, exc: BaseException, what: str
) -> None:
    """A background pass (scheduler, reaper) failed with ``exc``: an outage counts in the
    incident, which logs its one line; anything else is logged with its traceback, as a bug."""
    if unavailable(exc):
        incidents.failed(exc, what)
    else:
        logger.error("%s failed", what, exc_info=exc)
