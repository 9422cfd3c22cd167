"""Small SQL helpers shared by the route modules.

The hot routes execute Core statements built once at import against the tables (not the
mapped classes) with ``bindparam`` placeholders: building a statement, and the ORM's
compile-state and cache-key work for an ORM-enabled one, cost more Python than the database
spends on the rows. A statement built once memoizes its cache key, so each execution is a
dictionary look-up for the compiled SQL plus the driver call.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

from sqlalchemy import CursorResult, Executable, Table
from sqlalchemy.orm import DeclarativeBase, Session


def affected(session: Session, statement: Executable) -> int:
    """Rows an UPDATE or DELETE touched: how a conditional write tells who won a race."""
    result = cast(CursorResult[Any], session.execute(statement))
    return result.rowcount


def table_of(model: type[DeclarativeBase]) -> Table:
    """The model's table, for Core statements (typed as the ``Table`` it always is here)."""
    return cast(Table, model.__table__)


def for_dialect(session: Session, statements: Mapping[str, Executable]) -> Executable:
    """The session's database's variant of a statement that is spelled per dialect (an
    ``INSERT ... ON CONFLICT``: SQLite and PostgreSQL each have their own construct)."""
    return statements[session.get_bind().dialect.name]
