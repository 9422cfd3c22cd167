"""The hottest task and parse routes served without the FastAPI layer, with the same checks.

A running task reads variables and XComs and sends heartbeats; with small JSON bodies, the
routing, dependency solving, validation and serialisation of FastAPI cost several times the
token check and the database work together. :class:`TaskFastPath` is an ASGI middleware that
answers these requests itself when they have the ordinary shape. What it may answer is the
``FAST`` rows of the sandbox surface (:mod:`privsep.client._surface`), plus the supervisor's
claim; :data:`HANDLERS` maps each to its handler, and the middleware dispatches by looking the
request up there:

* ``GET /v1/task/context`` (a task whose supervisor did not pass the claim's context on)
* ``GET /v1/task/variables/{key}``
* ``GET /v1/task/xcoms/{task_id}/{key}``
* ``POST /v1/task/heartbeat`` without a body
* ``POST /v1/task/succeed`` with a small JSON body (every successful task's last request)
* ``POST /v1/supervisor/claim`` with a small JSON body (a supervisor's request for work,
  about one per task), checked by :func:`~privsep.server.auth.active_supervisor` (active, and
  still under the key generation its session was opened with) and done by
  :func:`~privsep.server.services.claims.claim_work`, whose answer is made before its
  transaction commits
* ``POST /v1/parse/result`` with a small JSON body (every parsed definition file's last
  request), done by :func:`~privsep.server.services.parse_results.store_result`, whose first
  statement is the conditional write that checks what the route's dependency checks first:
  the job is running under the supervisor the token names

and hands everything else to the application, untouched. The routes stay declared in FastAPI
(and in the OpenAPI document) and keep serving every request the fast path passes on.

Security does not change, because the fast path only ever answers **200**, and only after the
same checks as the routes, done by the same functions. (The one other answer is the **503**
with ``Retry-After`` of a database outage, given only after the token verified, as the route
would give it: see :mod:`privsep.server.db.outage`. Passing those on would only make the route
fail the same way a second time.)

* the token: :func:`~privsep.server.auth.token_in_header` on the first ``Authorization``
  header, then :func:`~privsep.server.auth.verify_silently`: the verified-token cache, or a
  full signature and claims check against the keys already loaded (a token that fails it is
  passed on, and the route reloads the keys if need be, refuses and audits);
* the attempt, the grant and the value: the functions of
  :mod:`privsep.server.services.attempts` (``read_context``, ``read_variable``,
  ``read_xcom``, ``beat`` and ``finish_success``), exactly as the routes run them. The
  success is one write transaction that either commits whole or not at all, so when it fails
  (a refusal, a busy database) the route can do it again from the start. So is a parse
  result; its body is decoded and validated as FastAPI does it (``json.loads``, then the
  model), so the fast path takes no body that the route would refuse.

Anything else passes the request on to FastAPI, which checks it all again and answers with
the usual status, ``{code, message}`` body and audit record: a query string (the route refuses
tokens in URLs), a missing or malformed header, a token that does not verify, a body where
none belongs, a success body that is not small, plain JSON of the right shape, a refusal, a
missing value, a database error. A body the fast path read is handed on unchanged. Refusals
are rare, so doing their checks twice costs nothing that matters, and it means every error
answer comes from one place.

Where the read runs: on SQLite, on the event loop itself (a few tens of microseconds against
the page cache, less than the hop to a worker thread; its connection gives up after
:data:`~privsep.server.state.INLINE_BUSY_TIMEOUT_MS` and the request is passed on). On
PostgreSQL, in one worker thread, since a network round trip must not block the loop. The
heartbeat writes, so it always runs in a worker thread.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final, TypeVar

from pydantic_core import to_json
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from privsep.client._surface import BY_NAME as ROUTES_BY_NAME
from privsep.client._surface import FAST, ROUTES, Route
from privsep.secrets.tokens import Claims
from privsep.server.auth import (
    active_supervisor,
    parse_token_of,
    task_token_of,
    token_in_header,
    verify_silently,
)
from privsep.server.db.outage import unavailable
from privsep.server.errors import UNAVAILABLE_CODE, UNAVAILABLE_HEADERS, UNAVAILABLE_MESSAGE
from privsep.server.metrics import FAST_PATH, ROUTE_KEY
from privsep.server.readpool import ReadPool
from privsep.server.schemas import ClaimRequest, ParseResultRequest, SucceedRequest
from privsep.server.services import attempts, claims, parse_results
from privsep.server.state import ServerState

T = TypeVar("T")

_OK = b'{"ok":true}'
_SUCCESS = b'{"state":"success"}'
# A body the fast path reads itself; anything larger goes to the route, unread, and meets the
# application's own body cap there.
MAX_FAST_BODY = 64 * 1024

CLAIM: Final = Route("supervisor.claim", "POST", "/v1/supervisor/claim", "supervisor", FAST)
"""The one fast route that is not a sandbox's: the supervisor's request for work (about one
per task). Not a row of the sandbox surface: no sandbox token is ever of its scope."""

# What a handler gets: the fast path, the verified claims, the body (``b""`` for none) and
# the path's parameters; it answers the 200 body, or ``None`` (or raises) to pass it on.
Handler = Callable[["TaskFastPath", Claims, bytes, dict[str, str]], Awaitable[bytes | None]]


@dataclass(frozen=True)
class Fast:
    """One row's handler, and whether the row takes a small JSON body (else none at all)."""

    handler: Handler
    body: bool = False


async def _context(fast: TaskFastPath, claims: Claims, _: bytes, __: dict[str, str]) -> bytes:
    context = await fast.read(attempts.read_context, task_token_of(claims))
    return to_json(context.model_dump())


async def _variable(fast: TaskFastPath, claims: Claims, _: bytes, params: dict[str, str]) -> bytes:
    key = params["key"]
    value = await fast.read(attempts.read_variable, task_token_of(claims), key)
    return to_json({"key": key, "value": value})


async def _xcom(fast: TaskFastPath, claims: Claims, _: bytes, params: dict[str, str]) -> bytes:
    task_id, key = params["task_id"], params["key"]
    value = await fast.read(attempts.read_xcom, task_token_of(claims), task_id, key)
    return to_json({"task_id": task_id, "key": key, "value": value})


async def _heartbeat(fast: TaskFastPath, claims: Claims, _: bytes, __: dict[str, str]) -> bytes:
    await run_in_threadpool(attempts.beat, fast.state, task_token_of(claims))
    return _OK


async def _succeed(fast: TaskFastPath, claims: Claims, raw: bytes, _: dict[str, str]) -> bytes:
    token = task_token_of(claims)
    success = SucceedRequest.model_validate_json(raw)
    await run_in_threadpool(attempts.finish_success, fast.state, token, success.return_value)
    return _SUCCESS


async def _parse_result(fast: TaskFastPath, claims: Claims, raw: bytes, _: dict[str, str]) -> bytes:
    """Decoded as FastAPI decodes it (``json.loads``, then the model), so the fast path takes
    no body the route would refuse. The result ends the job only if it is running under the
    token's supervisor, and otherwise rolls back and raises: the route then refuses the
    token, with its audit record."""
    result = ParseResultRequest.model_validate(json.loads(raw))
    await run_in_threadpool(parse_results.store_result, fast.state, parse_token_of(claims), result)
    return _OK


async def _claim(
    fast: TaskFastPath, claims_: Claims, raw: bytes, _: dict[str, str]
) -> bytes | None:
    """A supervisor's claim, if it is active: the answer was made before the claim committed."""
    me = await active_supervisor(fast.state, claims_)
    if me is None:
        return None
    request = ClaimRequest.model_validate_json(raw)
    return await run_in_threadpool(claims.claim_work, fast.state, me, request)


HANDLERS: Final[dict[Route, Fast]] = {
    ROUTES_BY_NAME["task.context"]: Fast(_context),
    ROUTES_BY_NAME["task.variable"]: Fast(_variable),
    ROUTES_BY_NAME["task.pull_xcom"]: Fast(_xcom),
    ROUTES_BY_NAME["task.heartbeat"]: Fast(_heartbeat),
    ROUTES_BY_NAME["task.succeed"]: Fast(_succeed, body=True),
    ROUTES_BY_NAME["parse.result"]: Fast(_parse_result, body=True),
    CLAIM: Fast(_claim, body=True),
}
"""Each ``FAST`` row's handler (and the claim's). Every ``FAST`` row must have one, and
nothing else may: checked here, at import, so a row cannot be marked fast without a handler
nor a handler added without a row."""

if {route for route in HANDLERS if route is not CLAIM} != {r for r in ROUTES if FAST in r.flags}:
    raise RuntimeError("the fast path's handlers and the FAST rows of the sandbox surface differ")

# Literal paths are found with one dictionary look-up; templated ones by their pattern.
_EXACT = {(route.method, route.path): route for route in HANDLERS if "{" not in route.path}
_TEMPLATED = [route for route in HANDLERS if "{" in route.path]
_SCOPES = {route: frozenset({route.scope}) for route in HANDLERS}


def _route_of(method: str, path: str) -> tuple[Route, dict[str, str]] | None:
    route = _EXACT.get((method, path))
    if route is not None:
        return route, {}
    for route in _TEMPLATED:
        params = route.match(method, path)
        if params is not None:
            return route, params
    return None


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
            try:
                body, receive = await self._answer(scope, receive)
            except _DatabaseUnavailable:
                self.served += 1
                await _send_unavailable(send)
                return
            if body is not None:
                self.served += 1
                FAST_PATH.inc()
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

    async def read(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(reads, *args)`` on the read pool: on the event loop against SQLite, in a worker
        thread against PostgreSQL (see the module docstring)."""
        state = self.state
        if state.inline_reads is not None:
            return fn(state.inline_reads, *args)
        reads: ReadPool = state.reads
        return await run_in_threadpool(fn, reads, *args)

    async def _answer(self, scope: Scope, receive: Receive) -> tuple[bytes | None, Receive]:
        """The 200 body, or ``None`` to pass the request on; and the ``receive`` to pass it on
        with (one that replays the body, if this read it)."""
        found = _route_of(scope["method"], scope["path"])
        if found is None or scope.get("query_string") or scope.get("root_path"):
            return None, receive
        route, params = found
        scope[ROUTE_KEY] = route.path  # the metrics' label, should this answer
        fast = HANDLERS[route]
        raw_token, length = self._headers(scope)
        if raw_token is None:
            return None, receive
        raw = b""
        if fast.body:
            if length is None or not 0 < length <= MAX_FAST_BODY:
                return None, receive
            body, taken = await _read_body(receive, length)
            receive = _replaying(taken, receive)
            if body is None:
                return None, receive
            raw = body
        elif length != 0:
            return None, receive  # a body where the route takes none: the route says so
        try:
            verified = verify_silently(self.state, raw_token, _SCOPES[route])
            if verified is None:
                return None, receive
            return await fast.handler(self, verified, raw, params), receive
        except Exception as exc:  # a refusal, a bad body, a busy database: the route answers
            if unavailable(exc):
                self.state.db.incidents.failed(exc, f"{scope['method']} {scope['path']}")
                raise _DatabaseUnavailable from None
            return None, receive

    def _headers(self, scope: Scope) -> tuple[str | None, int | None]:
        """The bearer token of a JSON request (else ``None``) and the body's declared length
        (``None`` when unknown: chunked)."""
        authorization: bytes | None = None
        length: int | None = 0
        content_type: bytes | None = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                if authorization is None:
                    authorization = value
            elif name == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    return None, None
            elif name == b"transfer-encoding":
                length = None
            elif name == b"content-type":
                content_type = value
        if authorization is None or (length and content_type != b"application/json"):
            return None, length
        try:
            return token_in_header(authorization.decode("latin-1")), length
        except Exception:
            return None, length


class _DatabaseUnavailable(Exception):
    """The database is away: answer 503 here rather than pass the request on."""


_UNAVAILABLE_BODY = to_json({"code": UNAVAILABLE_CODE, "message": UNAVAILABLE_MESSAGE})


async def _send_unavailable(send: Send) -> None:
    """The same 503 that :func:`~privsep.server.errors.install_error_handlers` gives."""
    headers = [(b"content-length", str(len(_UNAVAILABLE_BODY)).encode("ascii"))]
    headers.append((b"content-type", b"application/json"))
    headers += [
        (k.lower().encode("ascii"), v.encode("ascii")) for k, v in UNAVAILABLE_HEADERS.items()
    ]
    await send({"type": "http.response.start", "status": 503, "headers": headers})
    await send({"type": "http.response.body", "body": _UNAVAILABLE_BODY})


async def _read_body(receive: Receive, length: int) -> tuple[bytes | None, list[Message]]:
    """The whole body if it is exactly ``length`` bytes (else ``None``: a client that went
    away or sent something else is the route's to answer), and every message it took from
    ``receive``, to replay them as they came if the request is passed on."""
    taken: list[Message] = []
    size = 0
    while True:
        message = await receive()
        taken.append(message)
        if message["type"] != "http.request":
            return None, taken
        size += len(message.get("body", b""))
        if size > length:
            return None, taken
        if not message.get("more_body", False):
            break
    body = b"".join(m.get("body", b"") for m in taken)
    return (body if len(body) == length else None), taken


def _replaying(taken: list[Message], receive: Receive) -> Receive:
    """A ``receive`` that first hands out the messages already taken, then the real one's."""
    if not taken:
        return receive
    pending = list(reversed(taken))

    async def replay() -> Message:
        if pending:
            return pending.pop()
        return await receive()

    return replay
