"""The one thing the credential socket does off the loop thread: an API call for a sandbox.

A sandbox without network asks its socket to make an API call with its token. That call can
take seconds, so it runs on a small pool, never on the selector loop that every other sandbox's
token goes through; this module is that pool's side: what it checks again, how it calls the
supervisor's handler, and how whatever happens becomes one reply for the child (an unreachable
API, a failing handler and an unrelayable answer each get their own error code, and none of
their messages carries the token).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Final

from privsep._token import Token
from privsep.client._exceptions import ProtocolError
from privsep.client._wire import (
    METHODS,
    SERVER_UNAVAILABLE,
    ErrorReply,
    ProxyRequest,
    ProxyResponse,
    ToSandbox,
    check_proxy_path,
    encode_frame,
)

log = logging.getLogger("privsep.supervisor.credsock")

DEFAULT_PROXY_WORKERS: Final = 16

ProxyHandler = Callable[[str, str, str, Any, str], tuple[int, Any]]
"""``proxy_handler(sandbox_id, method, path, body, token) -> (status, json_body)``, run off the
selector thread. ``sandbox_id`` says whose call it is, so the supervisor can note what a
sandbox reported (a task's own ``succeed``, say) without parsing its token. Raising
:class:`OSError` (which includes every ``requests`` exception and the supervisor's
``HttpUnavailable``) means "the API could not be reached" and becomes
``ErrorReply(code="server_unavailable")``. It must time out on its own: a call that never
returns holds one pool thread for good."""


def check_proxy_request(request: ProxyRequest) -> None:
    """Raise :class:`ProtocolError` unless the method and path may be proxied.
    ``parse_request`` has checked both; checked again here because this is where it counts."""
    if request.method not in METHODS:
        raise ProtocolError(f"proxy method {request.method[:20]!r} is not allowed")
    check_proxy_path(request.method, request.path)


def call_proxy(
    sandbox_id: str, request: ProxyRequest, token: Token, handler: ProxyHandler
) -> ToSandbox:
    """Runs on a pool thread: one API call, turned into the reply for the child."""
    what = f"{request.method} {request.path}"
    try:
        status, body = handler(
            sandbox_id, request.method, request.path, request.body, token.reveal()
        )
    except OSError as exc:  # includes every requests exception
        log.warning(
            "credential socket %s: proxy %s: API unreachable: %s",
            sandbox_id,
            what,
            token.scrub(f"{type(exc).__name__}: {exc}"),
        )
        return ErrorReply(
            code=SERVER_UNAVAILABLE, message=f"{what}: the supervisor could not reach the API"
        )
    except Exception as exc:
        log.error(
            "credential socket %s: proxy %s failed: %s",
            sandbox_id,
            what,
            token.scrub(f"{type(exc).__name__}: {exc}"),
        )
        return ErrorReply(code="proxy_failed", message=f"{what}: the supervisor failed")
    try:
        reply = ProxyResponse(status=status, body=body)
        encode_frame(reply.to_wire())
    except ProtocolError as exc:  # FrameTooLarge included
        log.warning(
            "credential socket %s: proxy %s: cannot relay the response: %s",
            sandbox_id,
            what,
            token.scrub(str(exc)),
        )
        return ErrorReply(code="bad_response", message=f"{what}: the response cannot be relayed")
    return reply


__all__ = ["DEFAULT_PROXY_WORKERS", "ProxyHandler", "call_proxy", "check_proxy_request"]
