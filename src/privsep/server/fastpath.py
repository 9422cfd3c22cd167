"""The hottest task and parse routes served without the FastAPI layer, with the same checks.

A running task reads variables and XComs and sends heartbeats; with small JSON bodies, the
routing, dependency solving, validation and serialisation of FastAPI cost several times the
token check and the database work together. :class:`TaskFastPath` is an ASGI middleware that
answers these requests itself when they have the ordinary shape:

* ``GET /v1/task/context`` (every task's first request)
* ``GET /v1/task/variables/{key}``
* ``GET /v1/task/xcoms/{task_id}/{key}``
* ``POST /v1/task/heartbeat`` without a body
* ``POST /v1/task/succeed`` with a small JSON body (every successful task's last request)
* ``POST /v1/supervisor/claim`` with a small JSON body (a supervisor's request for work,
  about one per task), checked by :func:`~privsep.server.auth.active_supervisor` and done by
  :func:`~privsep.server.routes.supervisor.claim_work`, whose answer is made before its
  transaction commits
* ``POST /v1/parse/result`` with a small JSON body (every parsed definition file's last
  request), done by :func:`~privsep.server.routes.parse_trigger.submit_result`, whose first
  statement is the conditional write that checks what the route's dependency checks first:
  the job is running under the supervisor the token names

and hands everything else to the application, untouched. The routes stay declared in FastAPI
(and in the OpenAPI document) and keep serving every request the fast path passes on.

Security does not change, because the fast path only ever answers **200**, and only after the
same checks as the routes, done by the same functions:

* the token: :func:`~privsep.server.auth.token_in_header` on the first ``Authorization``
  header, then :func:`~privsep.server.auth.verify_silently`: the verified-token cache, or a
  full signature and claims check against the keys already loaded (a token that fails it is
  passed on, and the route reloads the keys if need be, refuses and audits);
* the attempt, the grant and the value: :func:`~privsep.server.routes.task.read_context`,
  :func:`~privsep.server.routes.task.read_variable`,
  :func:`~privsep.server.routes.task.read_xcom`, :func:`~privsep.server.routes.task.beat` and
  :func:`~privsep.server.routes.task.finish_success`, exactly as the routes run them. The
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
from typing import Any

from pydantic_core import to_json
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from privsep.secrets.tokens import Claims
from privsep.server.auth import (
    PARSE_SCOPES,
    SUPERVISOR_SCOPES,
    TASK_SCOPES,
    TaskToken,
    active_supervisor,
    parse_token_of,
    task_token_of,
    token_in_header,
    verify_silently,
)
from privsep.server.routes.parse_trigger import submit_result
from privsep.server.routes.supervisor import claim_work
from privsep.server.routes.task import (
    beat,
    finish_success,
    read_context,
    read_variable,
    read_xcom,
)
from privsep.server.schemas import ClaimRequest, ParseResultRequest, SucceedRequest
from privsep.server.state import ServerState

_CONTEXT = "/v1/task/context"
_VARIABLES = "/v1/task/variables/"
_XCOMS = "/v1/task/xcoms/"
_HEARTBEAT = "/v1/task/heartbeat"
_SUCCEED = "/v1/task/succeed"
_CLAIM = "/v1/supervisor/claim"
_PARSE_RESULT = "/v1/parse/result"
_OK = b'{"ok":true}'
_SUCCESS = b'{"state":"success"}'
# A success body the fast path reads itself; anything larger goes to the route, unread, and
# meets the application's own body cap there.
MAX_FAST_BODY = 64 * 1024

_GET_CONTEXT, _GET_VARIABLE, _GET_XCOM, _HEARTBEAT_ROUTE, _SUCCEED_ROUTE, _CLAIM_ROUTE = range(6)


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
            body, receive = await self._answer(scope, receive)
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

    async def _answer(self, scope: Scope, receive: Receive) -> tuple[bytes | None, Receive]:
        """The 200 body, or ``None`` to pass the request on; and the ``receive`` to pass it on
        with (one that replays the body, if this read it)."""
        method = scope["method"]
        path: str = scope["path"]
        if method == "GET":
            if path == _CONTEXT:
                route = _GET_CONTEXT
            elif path.startswith(_VARIABLES):
                key = path[len(_VARIABLES) :]
                if not key or "/" in key:
                    return None, receive
                route = _GET_VARIABLE
            elif path.startswith(_XCOMS):
                task_id, _, key = path[len(_XCOMS) :].partition("/")
                if not task_id or not key or "/" in key:
                    return None, receive
                route = _GET_XCOM
            else:
                return None, receive
        elif method == "POST" and path == _HEARTBEAT:
            route = _HEARTBEAT_ROUTE
        elif method == "POST" and path == _SUCCEED:
            route = _SUCCEED_ROUTE
        elif method == "POST" and path == _CLAIM:
            return await self._claim(scope, receive)
        elif method == "POST" and path == _PARSE_RESULT:
            return await self._parse_result(scope, receive)
        else:
            return None, receive
        if scope.get("query_string") or scope.get("root_path"):
            return None, receive
        token, length = self._token(scope)
        if token is None:
            return None, receive
        if route == _SUCCEED_ROUTE:
            if length is None or not 0 < length <= MAX_FAST_BODY:
                return None, receive
            raw, taken = await _read_body(receive, length)
            receive = _replaying(taken, receive)
            if raw is None:
                return None, receive
        elif length:
            return None, receive  # a body where the route takes none: the route says so
        state = self.state
        try:
            if route == _GET_CONTEXT:
                if state.inline_reads is not None:
                    context = read_context(state.inline_reads, token)
                else:
                    context = await run_in_threadpool(read_context, state.reads, token)
                return to_json(context.model_dump()), receive
            if route == _GET_VARIABLE:
                if state.inline_reads is not None:
                    value: Any = read_variable(state.inline_reads, token, key)
                else:
                    value = await run_in_threadpool(read_variable, state.reads, token, key)
                return to_json({"key": key, "value": value}), receive
            if route == _GET_XCOM:
                if state.inline_reads is not None:
                    value = read_xcom(state.inline_reads, token, task_id, key)
                else:
                    value = await run_in_threadpool(read_xcom, state.reads, token, task_id, key)
                return to_json({"task_id": task_id, "key": key, "value": value}), receive
            if route == _HEARTBEAT_ROUTE:
                await run_in_threadpool(beat, state, token)
                return _OK, receive
            assert raw is not None  # noqa: S101 - read above
            success = SucceedRequest.model_validate_json(raw)
            await run_in_threadpool(finish_success, state, token, success.return_value)
            return _SUCCESS, receive
        except Exception:  # a refusal, a bad body, a busy database: the route answers
            return None, receive

    async def _small_json(
        self, scope: Scope, receive: Receive, scopes: frozenset[str]
    ) -> tuple[Claims | None, bytes, Receive]:
        """The verified claims (of one of ``scopes``) and the whole body of a small JSON
        request without a query string, else ``None`` claims; and the ``receive`` to pass the
        request on with (replaying whatever body was read)."""
        if scope.get("query_string") or scope.get("root_path"):
            return None, b"", receive
        raw_token, length = self._headers(scope)
        if raw_token is None or length is None or not 0 < length <= MAX_FAST_BODY:
            return None, b"", receive
        raw, taken = await _read_body(receive, length)
        receive = _replaying(taken, receive)
        if raw is None:
            return None, b"", receive
        try:
            claims = verify_silently(self.state, raw_token, scopes)
        except Exception:  # anything doubtful: the route answers
            return None, b"", receive
        return claims, raw, receive

    async def _claim(self, scope: Scope, receive: Receive) -> tuple[bytes | None, Receive]:
        """A supervisor's claim: its token, that it is active, a valid small body; then the
        claim, whose answer was made before it committed."""
        claims, raw, receive = await self._small_json(scope, receive, SUPERVISOR_SCOPES)
        if claims is None:
            return None, receive
        state = self.state
        try:
            me = await active_supervisor(state, claims.sub)
            if me is None:
                return None, receive
            request = ClaimRequest.model_validate_json(raw)
            return await run_in_threadpool(claim_work, state, me, request), receive
        except Exception:  # a refusal, a bad body, a busy database: the route answers
            return None, receive

    async def _parse_result(self, scope: Scope, receive: Receive) -> tuple[bytes | None, Receive]:
        """A parse sandbox's result: its token, a valid small body; then the result, which
        ends the job only if it is running under the token's supervisor and otherwise rolls
        back and raises (the route then refuses the token, with its audit record)."""
        claims, raw, receive = await self._small_json(scope, receive, PARSE_SCOPES)
        if claims is None:
            return None, receive
        try:
            result = ParseResultRequest.model_validate(json.loads(raw))
            await run_in_threadpool(submit_result, result, parse_token_of(claims), self.state)
            return _OK, receive
        except Exception:  # a refusal, a bad body, a busy database: the route answers
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

    def _token(self, scope: Scope) -> tuple[TaskToken | None, int | None]:
        """The task token, if it verifies, and the body's declared length (0 for none,
        ``None`` when unknown: chunked); ``(None, ...)`` to pass the request on."""
        raw_token, length = self._headers(scope)
        if raw_token is None:
            return None, length
        try:
            claims = verify_silently(self.state, raw_token, TASK_SCOPES)
            return (task_token_of(claims) if claims is not None else None), length
        except Exception:
            return None, length


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
