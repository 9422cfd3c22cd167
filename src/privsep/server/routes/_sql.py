"""Small SQL helpers shared by the route modules."""

from __future__ import annotations

from typing import Any, cast

from sqlalchemy import CursorResult, Executable
from sqlalchemy.orm import Session


def affected(session: Session, statement: Executable) -> int:
    """Rows an UPDATE or DELETE touched: how a conditional write tells who won a race."""
    result = cast(CursorResult[Any], session.execute(statement))
    return result.rowcount
