"""Engines and sessions for the two supported backends: SQLite (default) and PostgreSQL.

SQLite
    One file, several server threads (and, in ``runner standalone``, a scheduler), so:

    * ``journal_mode=WAL``: readers never block the writer and the writer never blocks readers.
    * ``foreign_keys=ON``: SQLite ignores foreign keys unless asked, per connection.
    * ``busy_timeout``: a writer that finds the write lock taken waits instead of failing.
    * ``BEGIN IMMEDIATE`` for writers. A plain ``BEGIN`` is deferred: the transaction starts as
      a reader and upgrades to a writer on its first write. Two such transactions that both
      read and then write deadlock on the upgrade, and SQLite resolves that by failing one of
      them with ``SQLITE_BUSY`` at once, *without* honouring ``busy_timeout``. ``BEGIN
      IMMEDIATE`` takes the write lock up front, so a second writer waits (up to
      ``busy_timeout``) at ``BEGIN`` and then sees the first writer's committed data.

    This uses the recipe from the SQLAlchemy SQLite dialect documentation: the ``sqlite3``
    driver is put in autocommit mode (``isolation_level = None``) so it emits no ``BEGIN`` of
    its own, and a ``begin`` event emits ours.

PostgreSQL
    Only through psycopg 3 (``postgresql+psycopg://``). Writers use the default READ COMMITTED
    isolation; claim queries should use ``SELECT ... FOR UPDATE SKIP LOCKED``. Read sessions
    run ``READ ONLY`` transactions.

The session choice
    :meth:`Database.write_session` is the default and the safe choice: ``BEGIN IMMEDIATE`` on
    SQLite, taken when the session is entered. :meth:`Database.read_session` is an opt-in for
    pure reads (the hot path of token checks and variable reads): a deferred ``BEGIN`` on SQLite
    with ``PRAGMA query_only`` on, and a ``READ ONLY`` transaction on PostgreSQL, so a read
    session that tries to write fails loudly instead of quietly reintroducing the deadlock.
    Anything that uses the engine directly (``engine.begin()``, Alembic) gets writer semantics.

Passwords
    A database URL may carry a password. Nothing here logs or raises a URL except through
    :func:`display_url`, which hides it.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any, Final

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import ConnectionPoolEntry

from privsep.server.db.outage import Incidents, incidents_for

SQLITE_DRIVERS: Final = frozenset({"sqlite", "sqlite+pysqlite"})
POSTGRES_DRIVER: Final = "postgresql+psycopg"

# How long a SQLite writer waits for the write lock before failing with "database is locked".
DEFAULT_SQLITE_BUSY_TIMEOUT_MS: Final = 10_000
# How long a PostgreSQL connection attempt may take before the command says it cannot connect.
DEFAULT_CONNECT_TIMEOUT_S: Final = 10

# Execution option that marks a connection's transactions as read-only (see read_session).
READ_ONLY_OPTION: Final = "privsep_read_only"
# Key in the pooled DBAPI connection's ``info`` remembering its current ``query_only`` value, so
# the PRAGMA is only sent when a connection switches between reading and writing.
_QUERY_ONLY_INFO_KEY: Final = "privsep_query_only"


class DatabaseURLError(ValueError):
    """A database URL privsep cannot use. The message never contains the password."""


class NestedWriteSessionError(RuntimeError):
    """A write session was opened inside another one in the same thread, on SQLite."""


def display_url(url: str | URL) -> str:
    """``url`` as text that is safe to print or log: the password is replaced by ``***``.

    An unparsable string is not echoed at all, since it may hold a password in a form the
    parser did not recognise.
    """
    try:
        parsed = make_url(url)
    except ArgumentError:
        return "<unparsable database URL>"
    return parsed.render_as_string(hide_password=True)


def parse_url(url: str | URL) -> URL:
    """Parse and validate a database URL, or raise :class:`DatabaseURLError`.

    Accepted: ``sqlite:///path`` and ``postgresql+psycopg://...``. Every other PostgreSQL
    spelling (``postgres://``, ``postgresql://``, ``postgresql+psycopg2://``, ...) is refused
    with the exact replacement: for those SQLAlchemy would look for psycopg2 (not a dependency)
    or fail with an error about a missing dialect plugin, which does not say what to write.
    """
    try:
        parsed = make_url(url)
    except ArgumentError:
        # SQLAlchemy's message repeats the whole string, password included.
        raise DatabaseURLError(
            "cannot parse the database URL; expected sqlite:///PATH or "
            "postgresql+psycopg://USER:PASSWORD@HOST:PORT/DATABASE"
        ) from None
    driver = parsed.drivername
    if driver in SQLITE_DRIVERS or driver == POSTGRES_DRIVER:
        return parsed
    if driver.split("+", 1)[0] in ("postgres", "postgresql"):
        suggestion = parsed.set(drivername=POSTGRES_DRIVER).render_as_string(hide_password=True)
        raise DatabaseURLError(
            f"unsupported PostgreSQL URL scheme {driver!r}: privsep talks to PostgreSQL only "
            f"through psycopg 3; write postgresql+psycopg:// instead, e.g. {suggestion}"
        )
    raise DatabaseURLError(
        f"unsupported database {driver!r} in {display_url(parsed)}; "
        "use sqlite:///PATH or postgresql+psycopg://"
    )


def sqlite_url_for(path: str | PathLike[str]) -> str:
    """The SQLite URL of the database file at ``path`` (made absolute, special characters quoted).

    Absolute because a relative URL would depend on the working directory of whichever process
    (server, ``runner db upgrade``) opens it.
    """
    absolute = Path(path).expanduser().resolve()
    return URL.create("sqlite", database=str(absolute)).render_as_string(hide_password=False)


def create_engine_for(
    url: str | URL,
    *,
    sqlite_busy_timeout_ms: int = DEFAULT_SQLITE_BUSY_TIMEOUT_MS,
    connect_timeout_s: int = DEFAULT_CONNECT_TIMEOUT_S,
    **engine_kwargs: Any,
) -> Engine:
    """An engine for ``url`` with privsep's per-backend settings (see the module docstring).

    ``engine_kwargs`` go to :func:`sqlalchemy.create_engine` (pool sizes, for instance).
    Raises :class:`DatabaseURLError` for URLs privsep does not support.
    """
    parsed = parse_url(url)
    if parsed.get_backend_name() == "sqlite":
        engine = create_engine(
            parsed,
            connect_args={"timeout": sqlite_busy_timeout_ms / 1000},
            **engine_kwargs,
        )
        _install_sqlite_events(engine, sqlite_busy_timeout_ms, sqlite_file_of(parsed))
        return engine
    connect_args = {"connect_timeout": connect_timeout_s, "application_name": "privsep"}
    connect_args.update(engine_kwargs.pop("connect_args", {}))
    return create_engine(parsed, connect_args=connect_args, **engine_kwargs)


def sqlite_file_of(url: URL) -> Path | None:
    """The database file of a SQLite URL, or None for in-memory and ``file:`` URI databases."""
    database = url.database
    if not database or database == ":memory:" or url.query.get("mode") == "memory":
        return None
    if database.startswith("file:"):
        return None
    return Path(database)


def _create_private_file(path: Path) -> None:
    """Create ``path`` empty with mode 0600 unless it exists.

    The database holds every secret the server keeps (encrypted connections, key ids, the audit
    trail), and SQLite would create it with the umask's mode, often world-readable. SQLite
    gives the ``-wal`` and ``-shm`` files the database file's mode, so they are covered too.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        return
    os.close(fd)


def _install_sqlite_events(engine: Engine, busy_timeout_ms: int, path: Path | None) -> None:
    """Per-connection PRAGMAs and our own BEGIN statements (the SQLAlchemy-documented recipe)."""

    @event.listens_for(engine, "do_connect")
    def _before_connect(*_: Any) -> None:
        if path is not None:
            _create_private_file(path)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
        # The driver must not begin transactions itself; _on_begin does, with the right mode.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
            cursor.execute("PRAGMA foreign_keys = ON")
            # Persistent in the file; answers "memory" for in-memory databases, which is fine.
            cursor.execute("PRAGMA journal_mode = WAL")
            # In WAL mode NORMAL syncs at checkpoints rather than at every commit. A crash of
            # the process loses nothing; a power cut can lose the last commits but never
            # corrupts the file. FULL made each commit an fsync taken under SQLite's single
            # write lock, which capped every write (claim, succeed, heartbeat) behind the disk.
            cursor.execute("PRAGMA synchronous = NORMAL")
            cursor.execute("PRAGMA query_only = OFF")
        finally:
            cursor.close()
        record.info[_QUERY_ONLY_INFO_KEY] = False

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        read_only = bool(conn.get_execution_options().get(READ_ONLY_OPTION, False))
        info = conn.connection.info
        if info.get(_QUERY_ONLY_INFO_KEY) != read_only:
            conn.exec_driver_sql(f"PRAGMA query_only = {'ON' if read_only else 'OFF'}")
            info[_QUERY_ONLY_INFO_KEY] = read_only
        conn.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")


@dataclass
class Database:
    """An engine plus the two kinds of session the server uses (see the module docstring).

    Build one per process with :meth:`from_url`; call :meth:`dispose` at shutdown.
    """

    engine: Engine
    _write_factory: sessionmaker[Session] = field(init=False, repr=False)
    _read_factory: sessionmaker[Session] = field(init=False, repr=False)
    # Which threads are inside a write session of this database (SQLite nesting guard).
    _writers: threading.local = field(init=False, repr=False, default_factory=threading.local)
    # This database's outages, shared with every other Database of the same URL in the process.
    incidents: Incidents = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.incidents = incidents_for(self.engine.url)
        self.incidents.on_start(self._drop_connections)
        # Objects stay usable after commit: handlers commit and then build the response.
        self._write_factory = sessionmaker(self.engine, expire_on_commit=False)
        read_options: dict[str, Any] = {READ_ONLY_OPTION: True}
        if self.engine.dialect.name == "postgresql":
            read_options["postgresql_readonly"] = True
        self._read_factory = sessionmaker(self.engine.execution_options(**read_options))

    @classmethod
    def from_url(cls, url: str | URL, **engine_kwargs: Any) -> Database:
        """A :class:`Database` on a new engine from :func:`create_engine_for`."""
        return cls(create_engine_for(url, **engine_kwargs))

    @property
    def display_url(self) -> str:
        """The engine's URL with the password hidden."""
        return self.engine.url.render_as_string(hide_password=True)

    @contextmanager
    def write_session(self) -> Iterator[Session]:
        """A session in one write transaction: committed on success, rolled back on error.

        On SQLite the transaction begins (``BEGIN IMMEDIATE``, taking the write lock) as the
        block is entered, so keep write sessions short and do slow work outside them.

        On SQLite, opening a write session while the same thread is inside one raises
        :class:`NestedWriteSessionError` at once: the inner ``BEGIN IMMEDIATE`` would wait for
        the lock its own outer transaction holds and fail with "database is locked" after the
        whole busy timeout. Do the inner work in the outer session, or after it has ended (for
        example, an audit record of a denial that must survive the outer rollback).
        """
        guard = self.engine.dialect.name == "sqlite"
        if guard:
            if getattr(self._writers, "active", False):
                raise NestedWriteSessionError(
                    "write_session() opened inside another write_session() of the same thread "
                    "on SQLite: it would wait for its own write lock and fail; use the outer "
                    "session, or write after it has ended"
                )
            self._writers.active = True
        try:
            with self._write_factory() as session, session.begin():
                session.connection()  # begin now, not at the first statement
                yield session
        finally:
            if guard:
                self._writers.active = False
        self.incidents.ok()  # committed: the database answers

    @contextmanager
    def read_session(self) -> Iterator[Session]:
        """A session in one read-only transaction, always rolled back; writes raise."""
        with self._read_factory() as session:
            try:
                yield session
                # Only a session that sent something says the database answers: one that
                # found all it needed in a cache never connected.
                answered = session.in_transaction()
            finally:
                session.rollback()
        if answered:
            self.incidents.ok()

    def listen(self, event_name: str, listener: Callable[..., Any]) -> None:
        """Call ``listener`` on ``event_name`` (a SQLAlchemy session event) of every write
        session: how the wake-up publisher sees what each transaction made claimable."""
        event.listen(self._write_factory, event_name, listener)

    def _drop_connections(self) -> None:
        """An outage began: every pooled connection is dead, so none is handed out again."""
        self.engine.dispose()

    def dispose(self) -> None:
        """Close every pooled connection."""
        self.engine.dispose()
