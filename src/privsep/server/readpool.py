"""Raw, read-only driver connections for the hottest reads (token checks and task reads).

A request of a running task (read a variable, pull an XCom) needs one small read: is the
attempt still running with this try and supervisor, which workflow it belongs to, what the
policy grants, and the value. Through an ORM session that costs several hundred microseconds
of Python per query (session, connection checkout, the ``begin`` event, result objects); the
same statement sent straight to the driver costs about as much as the database needs. So the
hot reads go through this pool of driver connections, one statement each, and everything else
keeps using :class:`~privsep.server.db.engine.Database` sessions.

What makes these connections safe to keep:

* They are made by the engine itself (``raw_connection()``, then detached from its pool), so
  they carry every setting the engine applies to a new connection (busy timeout, WAL, the
  private database file, PostgreSQL connect arguments).
* They are read-only for their whole life: ``PRAGMA query_only = ON`` on SQLite, and
  ``SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY`` on PostgreSQL. A query that tried
  to write would fail; nothing here can change the database.
* They run in autocommit mode, so each statement is its own read transaction: it sees every
  commit made before it started, and one statement is one consistent snapshot. That is why each
  hot read is written as a single statement that joins everything it needs.
* A connection that raised is closed, not reused. ``engine.dispose()`` (server shutdown, test
  teardown, and the start of a database outage: see :mod:`privsep.server.db.outage`) closes
  the idle ones, and those in use are closed when they come back.

The pool is a LIFO stack: the most recently used connection (warm page cache) is reused
first, and only as many connections exist as there were concurrent readers. Build one per
process, after any fork.
"""

from __future__ import annotations

import contextlib
import functools
import re
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import Engine, event

from privsep.server.db.outage import incidents_for

# SQL in this project's hot statements uses ``:name`` parameters (sqlite3's named style);
# psycopg wants ``%(name)s``.
_NAMED_PARAM = re.compile(r"(?<![:\w]):([A-Za-z_]\w*)")


@functools.cache
def _to_pyformat(sql: str) -> str:
    return _NAMED_PARAM.sub(r"%(\1)s", sql.replace("%", "%%"))


class ReadPool:
    """A LIFO pool of read-only driver connections of ``engine``; see the module docstring.

    ``busy_timeout_ms`` (SQLite only) overrides the engine's busy timeout on these
    connections: a reader on the event loop must give up quickly instead of stalling every
    other request of its worker (WAL readers are almost never busy; when one is, the caller
    falls back to the slow path, which waits in a worker thread).
    """

    def __init__(
        self, engine: Engine, *, busy_timeout_ms: int | None = None, max_idle: int = 16
    ) -> None:
        self.engine = engine
        self.dialect: str = engine.dialect.name
        self._busy_timeout_ms = busy_timeout_ms
        self._max_idle = max_idle
        self._idle: list[Any] = []
        self._lock = threading.Lock()
        self._generation = 0
        self._incidents = incidents_for(engine.url)
        event.listen(engine, "engine_disposed", self._on_dispose)

    # --- statements ---------------------------------------------------------------------------

    def sql(self, sqlite: str, postgresql: str | None = None) -> str:
        """The statement for this pool's dialect, from ``:name``-style SQL."""
        if self.dialect == "sqlite":
            return sqlite
        return _to_pyformat(postgresql if postgresql is not None else sqlite)

    def fetch(self, statement: str, params: Mapping[str, Any]) -> list[dict[str, Any]]:
        """Run one read statement (from :meth:`sql`) and return all its rows, each keyed by
        its columns' names as the statement gives them (an ``AS`` alias, or the column's own
        name): rows are read by name, so a column added or moved breaks nothing silently."""
        conn, generation = self._acquire()
        try:
            cursor = conn.execute(statement, params)
            rows: Sequence[tuple[Any, ...]] = cursor.fetchall()
            names = [column[0] for column in cursor.description or ()]
        except BaseException:
            _close_quietly(conn)  # whatever went wrong, do not hand this connection out again
            raise
        self._release(conn, generation)
        self._incidents.ok()
        return [dict(zip(names, row, strict=True)) for row in rows]

    # --- connections --------------------------------------------------------------------------

    def _acquire(self) -> tuple[Any, int]:
        with self._lock:
            generation = self._generation
            if self._idle:
                return self._idle.pop(), generation
        return self._connect(), generation

    def _release(self, conn: Any, generation: int) -> None:
        with self._lock:
            if generation == self._generation and len(self._idle) < self._max_idle:
                self._idle.append(conn)
                return
        _close_quietly(conn)

    def _connect(self) -> Any:
        proxied = self.engine.raw_connection()
        conn: Any = proxied.dbapi_connection
        proxied.detach()  # ours from now on: the engine's pool forgets it
        try:
            if self.dialect == "sqlite":
                # The engine's connect hook already put the driver in autocommit mode
                # (isolation_level None) and set WAL and the busy timeout.
                if self._busy_timeout_ms is not None:
                    conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout_ms)}")
                conn.execute("PRAGMA query_only = ON")
            else:
                conn.rollback()
                conn.autocommit = True
                conn.execute("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY")
        except BaseException:
            _close_quietly(conn)
            raise
        return conn

    def close(self) -> None:
        """Close the idle connections; those in use are closed when they come back."""
        with self._lock:
            self._generation += 1
            idle, self._idle = self._idle, []
        for conn in idle:
            _close_quietly(conn)

    def _on_dispose(self, engine: Engine) -> None:
        self.close()

    def __len__(self) -> int:
        return len(self._idle)


def _close_quietly(conn: Any) -> None:
    with contextlib.suppress(Exception):  # a connection that cannot even close is gone anyway
        conn.close()
