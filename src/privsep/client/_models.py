"""Plain values the API hands to workflow code: connections and trigger events."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, kw_only=True)
class Connection:
    """A connection granted to this workflow by operator policy.

    ``password`` and ``extra`` are secrets: ``repr`` and ``str`` show ``'***'`` for them (or
    ``None`` when unset), so printing a connection into a task log does not leak them. Read the
    attributes themselves to use the values.
    """

    conn_id: str
    conn_type: str
    host: str | None = None
    port: int | None = None
    login: str | None = None
    password: str | None = field(default=None, repr=False)
    schema: str | None = None
    extra: str | None = field(default=None, repr=False)

    def __repr__(self) -> str:
        def masked(value: str | None) -> str:
            return "None" if value is None else "'***'"

        return (
            f"Connection(conn_id={self.conn_id!r}, conn_type={self.conn_type!r}, "
            f"host={self.host!r}, port={self.port!r}, login={self.login!r}, "
            f"password={masked(self.password)}, schema={self.schema!r}, "
            f"extra={masked(self.extra)})"
        )

    __str__ = __repr__

    @property
    def extra_dejson(self) -> dict[str, Any]:
        """``extra`` parsed as a JSON object; ``{}`` when unset. Raises ``ValueError`` when
        ``extra`` is set but is not a JSON object (the value itself is not echoed)."""
        if not self.extra:
            return {}
        try:
            value = json.loads(self.extra)
        except json.JSONDecodeError:
            raise ValueError(f"extra of connection {self.conn_id!r} is not JSON") from None
        if not isinstance(value, dict):
            raise ValueError(f"extra of connection {self.conn_id!r} is not a JSON object")
        return value

    @classmethod
    def from_api(cls, body: dict[str, Any]) -> Connection:
        """Build from the API's ``ConnectionResponse`` body."""
        return cls(
            conn_id=str(body["conn_id"]),
            conn_type=str(body["conn_type"]),
            host=body.get("host"),
            port=body.get("port"),
            login=body.get("login"),
            password=body.get("password"),
            schema=body.get("schema"),
            extra=body.get("extra"),
        )


@dataclass(frozen=True)
class TriggerEvent:
    """What a trigger yields when its condition is met. ``payload`` must be JSON-serializable;
    the resumed task reads it as ``ctx.trigger_event.payload``."""

    payload: Any = None
