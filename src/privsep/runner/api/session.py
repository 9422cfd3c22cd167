"""The supervisor's session with the server: prove identity, keep a session token, call.

The long-lived Ed25519 key never leaves this process: each session starts with a fresh
single-use assertion signed by it, and the server answers with a short session token. The
token is renewed before it expires, and a 401 renews it once more before giving up; that flow
is :class:`~privsep.runner.api.client.SessionClient`, shared with the operator commands. What
is the supervisor's own: statuses become exceptions its loop retries on or gives up on, and a
first session is waited for with backoff.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from privsep.runner.api.client import SessionClient, SessionRefused
from privsep.runner.api.keepalive import HttpReply, HttpUnavailable
from privsep.runner.api.token_file import SessionNotReady, SharedSession

log = logging.getLogger("privsep.supervisor.api")

BACKOFF_FIRST = 1.0
BACKOFF_MAX = 300.0
# Waiting for the refresher's first token: it is on this host, so look again soon.
SHARED_WAIT_MAX = 5.0


class StopRequest(Protocol):
    """Whether to give up waiting: a ``threading.Event``, or the supervisor's signal queue."""

    def is_set(self) -> bool: ...

    def wait(self, timeout: float) -> bool: ...


class ServerUnavailable(Exception):
    """The server could not be reached, or answered 5xx, or (behind a token refresher) there
    is no valid session token yet: retry later, and not before ``retry_after`` seconds when
    the server said so (a 503 during a database outage)."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after

    def not_before(self, delay: float) -> float:
        """``delay``, or the server's ``Retry-After`` if that is longer."""
        return max(delay, self.retry_after or 0.0)


class ApiRefused(Exception):
    """The server answered a 4xx: retrying the same request will not help."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code


def backoff_delays(
    first: float = BACKOFF_FIRST, cap: float = BACKOFF_MAX, rng: random.Random | None = None
) -> Callable[[], float]:
    """Jittered exponential backoff ("full jitter"): each delay is uniform in [d/2, d], and
    d doubles up to ``cap``. Jitter keeps a fleet of supervisors from retrying in step."""
    rnd = rng or random.Random()  # noqa: S311 - jitter, not cryptography
    state = {"d": first}

    def next_delay() -> float:
        d = state["d"]
        state["d"] = min(cap, d * 2)
        return rnd.uniform(d / 2, d)

    return next_delay


class SupervisorApi(SessionClient):
    """Calls the internal API as one supervisor. Thread-safe.

    ``key`` is the supervisor's own Ed25519 key; a supervisor behind ``runner token-refresher``
    passes ``None`` and ``shared``, the file the refresher keeps its session token in.
    """

    def __init__(
        self,
        urls: str | Sequence[str],
        name: str,
        key: Ed25519PrivateKey | None,
        *,
        shared: SharedSession | None = None,
        audience: str | None = None,
        timeout: float = 10.0,
        unix_socket: str | None = None,
    ) -> None:
        first = urls if isinstance(urls, str) else (urls[0] if urls else "")
        super().__init__(
            urls,
            name=name,
            key=None if key is None else (lambda: key),
            session_path="/v1/supervisor/session",
            audience=audience or first.rstrip("/"),
            timeout=timeout,
            unix_socket=unix_socket,
            shared=shared,
        )
        self.supervisor_id = ""

    # --- sessions ---------------------------------------------------------------------------

    def open_session(self) -> None:
        """One attempt to exchange a fresh assertion for a session token."""
        try:
            body = self.new_session()
        except SessionNotReady as exc:
            raise ServerUnavailable(str(exc)) from exc
        except HttpUnavailable as exc:
            raise ServerUnavailable(str(exc)) from None
        except SessionRefused as exc:
            _data(exc.reply)  # raises for an error status
            raise ApiRefused(exc.reply.status, "bad_session", "no token in the answer") from None
        self.supervisor_id = str(body["subject"])

    def open_session_with_backoff(
        self, stop: StopRequest, on_wait: Callable[[float, str], None] | None = None
    ) -> bool:
        """Retry :meth:`open_session` with jittered exponential backoff (1 s up to 5 min)
        until it works or ``stop`` is set. A refusal (unknown supervisor, bad key) is final."""
        delays = backoff_delays()
        while not stop.is_set():
            try:
                self.open_session()
                return True
            except ServerUnavailable as exc:
                delay = exc.not_before(delays())
                if isinstance(exc.__cause__, SessionNotReady):
                    delay = min(delay, SHARED_WAIT_MAX)
                if on_wait:
                    on_wait(delay, str(exc))
                log.warning(
                    "cannot open a session with %s (%s); retrying in %.1f s",
                    self.base_url,
                    exc,
                    delay,
                )
                stop.wait(delay)
        return False

    def renew_if_due(self) -> None:
        if self.session_due():
            self.open_session()

    # --- calls ------------------------------------------------------------------------------

    def call(self, method: str, path: str, body: Any = None) -> Any:
        """An authenticated call; a 401 opens a new session and retries once."""
        self.renew_if_due()  # a refused renewal is reported as ApiRefused, as before
        try:
            reply = self.send(method, path, body)
        except HttpUnavailable as exc:
            raise ServerUnavailable(str(exc)) from None
        except SessionRefused as exc:
            reply = exc.reply
            if reply.status < 400:
                raise ApiRefused(reply.status, "bad_session", "no token in the answer") from None
        return _data(reply)


def _data(reply: HttpReply) -> Any:
    """The decoded body of a success; an error status as the exception the loop expects."""
    if reply.status >= 500:
        code = reply.data.get("code") if isinstance(reply.data, dict) else None
        raise ServerUnavailable(
            f"server answered {reply.status}" + (f" ({code})" if code else ""), reply.retry_after
        )
    data = reply.data
    if reply.status >= 400:
        code = data.get("code", "error") if isinstance(data, dict) else "error"
        message = data.get("message", "") if isinstance(data, dict) else reply.text
        raise ApiRefused(reply.status, str(code), str(message))
    return data
