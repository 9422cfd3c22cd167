"""The SDK that workflow code imports inside a sandbox.

It imports only the standard library and ``requests`` (and ``requests`` only when the sandbox
may call the API directly): it must load in an environment that has nothing else installed,
and it must never pull in trusted code. Everything public is here; modules whose names start
with ``_`` are private.

Authoring (in a definition file)::

    from privsep.client import Workflow, Context, Trigger, TriggerEvent

    wf = Workflow("etl", schedule="@hourly")

    @wf.task
    def extract(ctx: Context) -> dict:
        return {"rows": 3}              # becomes this task's XCom

    @wf.task(upstream=[extract], retries=2, retry_delay=5, timeout=60)
    def load(ctx: Context) -> int:
        return ctx.xcom_pull("extract")["rows"]

At run time, the supervisor gives the sandbox one environment variable,
``PRIVSEP_CREDENTIAL_SOCKET``; :class:`Client` (used through :class:`Context`) gets its
short-lived token or its API access there. Errors are rooted at :class:`PrivsepError`.
"""

from __future__ import annotations

from privsep.client._authoring import Context, Task, TaskDeferred, Trigger, Workflow
from privsep.client._client import DEFAULT_TIMEOUT, Client, connect
from privsep.client._exceptions import (
    APIError,
    BadRequest,
    ClientClosed,
    Conflict,
    ConnectionLost,
    DefinitionError,
    FrameTooLarge,
    NotFound,
    NotInSandbox,
    NotPermitted,
    PrivsepError,
    ProtocolError,
    Refused,
    ServerUnavailable,
    Unauthorized,
)
from privsep.client._models import Connection, TriggerEvent
from privsep.client._transport import MockTransport, Transport

__all__ = [
    "DEFAULT_TIMEOUT",
    "APIError",
    "BadRequest",
    "Client",
    "ClientClosed",
    "Conflict",
    "Connection",
    "ConnectionLost",
    "Context",
    "DefinitionError",
    "FrameTooLarge",
    "MockTransport",
    "NotFound",
    "NotInSandbox",
    "NotPermitted",
    "PrivsepError",
    "ProtocolError",
    "Refused",
    "ServerUnavailable",
    "Task",
    "TaskDeferred",
    "Transport",
    "Trigger",
    "TriggerEvent",
    "Unauthorized",
    "Workflow",
    "connect",
]

# Show public names as privsep.client.X (in reprs, tracebacks and docs), as httpx does.
for _name in __all__:
    _obj = globals()[_name]
    if getattr(_obj, "__module__", "").startswith("privsep.client."):
        _obj.__module__ = __name__
del _name, _obj
