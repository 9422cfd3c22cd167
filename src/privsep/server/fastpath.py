"""The hottest task routes served without the FastAPI layer, with the same checks.

A running task reads variables and XComs and sends heartbeats; with small JSON bodies, the
routing, dependency solving, validation and serialisation of FastAPI cost several times the
token check and the database read together. :class:`TaskFastPath` is an ASGI middleware that
answers these three requests itself when they have the ordinary shape:

* ``GET /v1/task/variables/{key}``
* ``GET /v1/task/xcoms/{task_id}/{key}``
* ``POST /v1/task/heartbeat`` without a body

and hands everything else to the application, untouched. The routes stay declared in FastAPI
(and in the OpenAPI document) and keep serving every request the fast path passes on.

Security does not change, because the fast path only ever answers **200**, and only after the
same checks as the routes, done by the same functions:

* the token: :func:`~privsep.server.auth.token_in_header` on the first ``Authorization``
  header, then the verified-token cache, which holds only tokens whose signature and claims
  this worker has fully verified and which have not expired (a token the cache does not hold
  is passed on, and the route verifies it and fills the cache);
* the attempt, the grant and the value: :func:`~privsep.server.routes.task.read_variable`,
  :func:`~privsep.server.routes.task.read_xcom` and :func:`~privsep.server.routes.task.beat`,
  one statement each, exactly as the routes run them.

Anything else passes the request on to FastAPI, which checks it all again and answers with
the usual status, ``{code, message}`` body and audit record: a query string (the route refuses
tokens in URLs), a missing or malformed header, an unknown or uncached token, a body, a
refusal, a missing value, a database error. Refusals are rare, so doing their checks twice
costs nothing that matters, and it means every error answer comes from one place.

Where the read runs: on SQLite, on the event loop itself (a few tens of microseconds against
the page cache, less than the hop to a worker thread; its connection gives up after
:data:`~privsep.server.state.INLINE_BUSY_TIMEOUT_MS` and the request is passed on). On
PostgreSQL, in one worker thread, since a network round trip must not block the loop. The
heartbeat writes, so it always runs in a worker thread.
"""

from __future__ import annotations

from typing import Any

from pydantic_core import to_json
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Receive, Scope, Send

from privsep.server.auth import TASK_SCOPES, TaskToken, task_token_of, token_in_header
from privsep.server.routes.task import beat, read_variable, read_xcom
from privsep.server.state import ServerState

_VARIABLES = "/v1/task/variables/"
_XCOMS = "/v1/task/xcoms/"
_HEARTBEAT = "/v1/task/heartbeat"
_OK = b'{"ok":true}'


class TaskFastPath:
    """Pure ASGI middleware; see the module docstring. ``served`` and ``passed_on`` count
    the requests it answered and those it handed to the application (for tests and
    benchmarks)."""

    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app = app
        self.state = state
        self.served = 0
        self.passed_on = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            body = await self._answer(scope)
            if body is not None:
                self.served += 1
                await send(
                    {
                        "type": "http.response.start",
                        "status": 200,
                        "headers": [
                            (b"content-length", str(len(body)).encode("ascii")),
                            (b"content-type", b"application/json"),
                        ],
                    }
                )
                await send({"type": "http.response.body", "body": body})
                return
            self.passed_on += 1
        await self.app(scope, receive, send)

    async def _answer(self, scope: Scope) -> bytes | None:
        """The 200 body, or ``None`` to pass the request on."""
        method = scope["method"]
        path: str = scope["path"]
        if method == "GET":
            if path.startswith(_VARIABLES):
                key = path[len(_VARIABLES) :]
                if not key or "/" in key:
                    return None
                route = 0
            elif path.startswith(_XCOMS):
                task_id, _, key = path[len(_XCOMS) :].partition("/")
                if not task_id or not key or "/" in key:
                    return None
                route = 1
            else:
                return None
        elif method == "POST" and path == _HEARTBEAT:
            route = 2
        else:
            return None
        if scope.get("query_string") or scope.get("root_path"):
            return None
        token = self._token(scope)
        if token is None:
            return None
        state = self.state
        try:
            if route == 0:
                if state.inline_reads is not None:
                    value: Any = read_variable(state.inline_reads, token, key)
                else:
                    value = await run_in_threadpool(read_variable, state.reads, token, key)
                return to_json({"key": key, "value": value})
            if route == 1:
                if state.inline_reads is not None:
                    value = read_xcom(state.inline_reads, token, task_id, key)
                else:
                    value = await run_in_threadpool(read_xcom, state.reads, token, task_id, key)
                return to_json({"task_id": task_id, "key": key, "value": value})
            await run_in_threadpool(beat, state, token)
            return _OK
        except Exception:  # a refusal, a missing value, a busy database: the route answers
            return None

    def _token(self, scope: Scope) -> TaskToken | None:
        """The task token, if it is one this worker has verified and the request carries no
        body; ``None`` otherwise."""
        authorization: bytes | None = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                if authorization is None:
                    authorization = value
            elif (name == b"content-length" and value != b"0") or name == b"transfer-encoding":
                return None
        if authorization is None:
            return None
        try:
            token = token_in_header(authorization.decode("latin-1"))
        except Exception:
            return None
        claims = self.state.token_cache.get(token, TASK_SCOPES)
        if claims is None:
            return None
        try:
            return task_token_of(claims)
        except Exception:
            return None
