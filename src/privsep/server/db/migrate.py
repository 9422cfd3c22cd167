"""Schema migrations: ``runner db upgrade`` and ``runner db check``, on Alembic.

Alembic is configured in code (no ``alembic.ini``), and the migration scripts ship inside the
package (``privsep/server/migrations``), so an installed wheel can upgrade its own database.

* :func:`upgrade` is idempotent: Alembic records applied revisions in ``alembic_version``, so a
  second run applies nothing and reports "already at head". It creates no rows except that
  bookkeeping. On PostgreSQL it holds a session-level advisory lock
  (:data:`ADVISORY_LOCK_KEY`) for the whole upgrade, so replicas that all run ``db upgrade`` at
  start serialize instead of racing to create the same tables; the loser then finds the schema
  at head and does nothing. On SQLite the migration transaction is ``BEGIN IMMEDIATE`` (see
  :mod:`.engine`), which serializes upgrades the same way.
* :func:`check` compares the database's revision with the newest one this code knows.
* :func:`main_upgrade` and :func:`main_check` are the command bodies: one line of output, and an
  exit status. They never print a password.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TextIO

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext, MigrationInfo
from alembic.script import ScriptDirectory
from alembic.util.exc import CommandError
from sqlalchemy import Connection, Engine, text
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.pool import NullPool

from privsep.server.db.engine import (
    DatabaseURLError,
    create_engine_for,
    parse_url,
    sqlite_file_of,
)

MIGRATIONS_DIR: Final = Path(__file__).resolve().parent.parent / "migrations"

# The PostgreSQL advisory lock held during an upgrade: the bytes of "privsep1" as a bigint. Any
# other tool that upgrades this database should take the same lock.
ADVISORY_LOCK_KEY: Final = 0x7072697673657031

EXIT_OK: Final = 0
# ``db check``: the database is not at head (behind, ahead, or empty).
EXIT_OUT_OF_DATE: Final = 1
# Any failure: bad URL, cannot connect, migration error. ``db upgrade`` also uses 1 for these,
# ``db check`` uses 2 so that scripts can tell "needs upgrade" from "broken".
EXIT_UPGRADE_FAILED: Final = 1
EXIT_CHECK_FAILED: Final = 2

NO_REVISION: Final = "<none>"

# Alembic keeps the running migration's context in module globals (``alembic.context``,
# ``alembic.op``), so two upgrades in one process at once would run each other's operations on
# each other's connections (on SQLite that ends in a segfault). Upgrades within a process take
# turns; upgrades across processes and hosts are serialized by the database (see module doc).
_ALEMBIC_LOCK: Final = threading.Lock()


class MigrationError(Exception):
    """An upgrade or check failed; the message is one line and holds no password."""


@dataclass(frozen=True)
class UpgradeResult:
    """What :func:`upgrade` did: the revisions before and after, and the steps it applied."""

    previous: str | None
    current: str | None
    head: str
    applied: tuple[str, ...]

    @property
    def already_at_head(self) -> bool:
        """True when nothing was applied because the database was already at head."""
        return not self.applied and self.current == self.head

    def describe(self) -> str:
        """One line for the command's output."""
        if self.already_at_head:
            return f"database already at head {self.head}, nothing to do"
        return (
            f"database upgraded from {self.previous or NO_REVISION} to "
            f"{self.current or NO_REVISION} (head {self.head}); applied {', '.join(self.applied)}"
        )


def alembic_config(connection: Connection | None = None) -> Config:
    """An Alembic :class:`Config` for the packaged migrations, built without ``alembic.ini``.

    ``env.py`` runs on ``connection`` (passed through ``config.attributes``), so the URL, and its
    password, never goes into the config. Developers can use this to write new revisions::

        command.revision(alembic_config(conn), message="...", autogenerate=True)
    """
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("path_separator", "os")
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    """The newest revision shipped with this code; the migration history must be linear."""
    heads = ScriptDirectory.from_config(alembic_config()).get_heads()
    if len(heads) != 1:
        raise MigrationError(f"migration history has {len(heads)} heads, expected 1: {heads}")
    return heads[0]


def current_revision(connection: Connection) -> str | None:
    """The revision recorded in the database, or None if it has never been upgraded."""
    heads = MigrationContext.configure(connection).get_current_heads()
    if connection.in_transaction():
        connection.rollback()
    if not heads:
        return None
    return ",".join(sorted(heads))


def upgrade(url: str | URL, *, engine: Engine | None = None) -> UpgradeResult:
    """Bring the database at ``url`` to head; a no-op if it is already there.

    Pass ``engine`` to reuse one (it is not disposed); otherwise a throwaway engine is used.
    Raises :class:`MigrationError` (or :class:`DatabaseURLError`) with a one-line message.
    """
    head = head_revision()
    applied: list[MigrationInfo] = []

    def record(*, step: MigrationInfo, **_: Any) -> None:
        applied.append(step)

    with _ALEMBIC_LOCK, _connect(url, engine) as connection, _upgrade_lock(connection):
        config = alembic_config(connection)
        config.attributes["on_version_apply"] = [record]
        try:
            command.upgrade(config, "head")
        except (CommandError, SQLAlchemyError) as exc:
            if connection.in_transaction():
                connection.rollback()
            raise MigrationError(f"upgrade failed: {_one_line(exc, url)}") from exc
        if connection.in_transaction():
            connection.commit()
        current = current_revision(connection)
    previous = (",".join(applied[0].source_revision_ids) or None) if applied else current
    return UpgradeResult(
        previous=previous,
        current=current,
        head=head,
        applied=tuple(step.up_revision_id or "" for step in applied),
    )


def check(url: str | URL, *, engine: Engine | None = None) -> tuple[str | None, str]:
    """``(current, head)`` revisions. Never creates anything, not even a SQLite file."""
    head = head_revision()
    parsed = parse_url(url)
    if parsed.get_backend_name() == "sqlite" and engine is None:
        path = sqlite_file_of(parsed)
        if path is not None and not path.exists():
            return None, head
    with _connect(parsed, engine) as connection:
        try:
            return current_revision(connection), head
        except SQLAlchemyError as exc:
            raise MigrationError(f"cannot read the schema revision: {_one_line(exc, url)}") from exc


def main_upgrade(url: str | URL, out: TextIO, err: TextIO | None = None) -> int:
    """``runner db upgrade``: one line on ``out``; errors as one line on ``err`` (default out).

    Exit status 0 when the database is at head afterwards, 1 on any error.
    """
    try:
        result = upgrade(url)
    except (MigrationError, DatabaseURLError) as exc:
        print(f"error: {exc}", file=err or out)
        return EXIT_UPGRADE_FAILED
    print(result.describe(), file=out)
    return EXIT_OK


def main_check(url: str | URL, out: TextIO, err: TextIO | None = None) -> int:
    """``runner db check``: prints ``database at revision X (head Y)``.

    Exit status 0 when X is Y, 1 when they differ (including an empty database), 2 on error.
    """
    try:
        current, head = check(url)
    except (MigrationError, DatabaseURLError) as exc:
        print(f"error: {exc}", file=err or out)
        return EXIT_CHECK_FAILED
    line = f"database at revision {current or NO_REVISION} (head {head})"
    if current is not None and current != head:
        known = {s.revision for s in ScriptDirectory.from_config(alembic_config()).walk_revisions()}
        if current not in known:
            line += "; the database is newer than this version of privsep"
    print(line, file=out)
    return EXIT_OK if current == head else EXIT_OUT_OF_DATE


@contextmanager
def _connect(url: str | URL, engine: Engine | None) -> Iterator[Connection]:
    """A connection, with connection failures turned into a one-line :class:`MigrationError`."""
    own_engine = engine is None
    if engine is None:
        engine = create_engine_for(url, poolclass=NullPool)
    try:
        try:
            connection = engine.connect()
        except (DBAPIError, OSError) as exc:
            raise MigrationError(
                f"cannot connect to {_target(engine.url)}: {_one_line(exc, engine.url)}"
            ) from exc
        with connection:
            yield connection
    finally:
        if own_engine:
            engine.dispose()


@contextmanager
def _upgrade_lock(connection: Connection) -> Iterator[None]:
    """Hold the upgrade advisory lock on PostgreSQL; nothing to do on SQLite (BEGIN IMMEDIATE).

    The lock is session-level, taken and released outside the migration transaction, so it
    covers reading the current revision as well as applying the steps.
    """
    if connection.dialect.name != "postgresql":
        yield
        return
    connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": ADVISORY_LOCK_KEY})
    connection.commit()
    try:
        yield
    finally:
        if connection.in_transaction():
            connection.rollback()
        if not connection.closed and not connection.invalidated:
            connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": ADVISORY_LOCK_KEY})
            connection.commit()


def _target(url: URL) -> str:
    """Where a URL points, for error messages: host, port, database and user; no password."""
    if url.get_backend_name() == "sqlite":
        return f"SQLite database {url.database or ':memory:'}"
    user = f" as {url.username}" if url.username else ""
    host = url.host or "localhost (unix socket)"
    port = url.port or 5432
    return f"PostgreSQL at {host}:{port}/{url.database or ''}{user}"


def _one_line(exc: BaseException, url: str | URL) -> str:
    """The driver's message of ``exc`` as one line, with the URL's password scrubbed out.

    SQLAlchemy appends the SQL statement and a documentation link; the driver's own message
    (``exc.orig``) is what tells an operator what went wrong.
    """
    cause: BaseException = exc.orig if isinstance(exc, DBAPIError) and exc.orig else exc
    lines = (" ".join(line.split()) for line in str(cause).splitlines())
    message = "; ".join(line for line in lines if line) or type(cause).__name__
    password = _password_of(url)
    if password:
        message = message.replace(password, "***")
    return message


def _password_of(url: str | URL) -> str | None:
    try:
        return parse_url(url).password
    except DatabaseURLError:
        return None


def new_revision(url: str | URL, message: str, *, autogenerate: bool = True) -> None:
    """Write a new migration script, diffing the models against the database at ``url``.

    For developers: run it against a database upgraded to head. The script lands in
    ``privsep/server/migrations/versions``; name and review it before committing.
    """
    with _ALEMBIC_LOCK, _connect(url, None) as connection:
        config = alembic_config(connection)
        command.revision(config, message=message, autogenerate=autogenerate)
        if connection.in_transaction():
            connection.commit()
