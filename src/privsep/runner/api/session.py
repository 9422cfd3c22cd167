"""The supervisor's session with the server: prove identity, keep a session token, call.

The long-lived Ed25519 key never leaves this process: each session starts with a fresh
single-use assertion (60 s at most) signed by it, and the server answers with a short session
token. The token is renewed before it expires, and a 401 renews it once more before giving up.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from privsep.runner.api.keepalive import HttpUnavailable, KeepAliveClient
from privsep.secrets.tokens import create_assertion

log = logging.getLogger("privsep.supervisor.api")

# Renew when less than this share of the session's life is left.
RENEW_AT_REMAINING = 0.3
BACKOFF_FIRST = 1.0
BACKOFF_MAX = 300.0


class ServerUnavailable(Exception):
    """The server could not be reached, or answered 5xx: retry later."""


class ApiRefused(Exception):
    """The server answered a 4xx: retrying the same request will not help."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code


@dataclass
class _Session:
    token: str
    expires_at: int
    issued_at: float


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


class SupervisorApi:
    """Calls the internal API as one supervisor. Thread-safe."""

    def __init__(
        self,
        base_url: str,
        name: str,
        key: Ed25519PrivateKey,
        *,
        audience: str | None = None,
        timeout: float = 10.0,
        unix_socket: str | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.name = name
        self._key = key
        self.audience = audience or self.base_url
        self.timeout = timeout
        # One kept connection per calling thread; see keepalive.py for why not requests.
        self._http = KeepAliveClient(self.base_url, timeout=timeout, unix_socket=unix_socket)
        self._lock = threading.Lock()
        self._session: _Session | None = None
        self.supervisor_id = ""

    def __repr__(self) -> str:
        return f"SupervisorApi(name={self.name!r}, url={self.base_url!r})"

    # --- sessions ---------------------------------------------------------------------------

    def open_session(self) -> None:
        """One attempt to exchange a fresh assertion for a session token."""
        assertion = create_assertion(
            self._key, supervisor_name=self.name, audience=self.audience, ttl_seconds=30
        )
        body = self._send("POST", "/v1/supervisor/session", {"assertion": assertion}, token=None)
        with self._lock:
            self._session = _Session(body["token"], int(body["expires_at"]), time.time())
            self.supervisor_id = str(body["subject"])

    def open_session_with_backoff(
        self, stop: threading.Event, on_wait: Callable[[float, str], None] | None = None
    ) -> bool:
        """Retry :meth:`open_session` with jittered exponential backoff (1 s up to 5 min)
        until it works or ``stop`` is set. A refusal (unknown supervisor, bad key) is final."""
        delays = backoff_delays()
        while not stop.is_set():
            try:
                self.open_session()
                return True
            except ServerUnavailable as exc:
                delay = delays()
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
        with self._lock:
            session = self._session
        if session is None:
            self.open_session()
            return
        life = max(1.0, session.expires_at - session.issued_at)
        if session.expires_at - time.time() < life * RENEW_AT_REMAINING:
            self.open_session()

    # --- calls ------------------------------------------------------------------------------

    def call(self, method: str, path: str, body: Any = None) -> Any:
        """An authenticated call; a 401 opens a new session and retries once."""
        self.renew_if_due()
        with self._lock:
            token = self._session.token if self._session else None
        try:
            return self._send(method, path, body, token=token)
        except ApiRefused as exc:
            if exc.status != 401:
                raise
        self.open_session()
        with self._lock:
            token = self._session.token if self._session else None
        return self._send(method, path, body, token=token)

    def _send(self, method: str, path: str, body: Any, *, token: str | None) -> Any:
        try:
            reply = self._http.request(method, path, body, token=token)
        except HttpUnavailable as exc:
            raise ServerUnavailable(str(exc)) from None
        if reply.status >= 500:
            raise ServerUnavailable(f"server answered {reply.status}")
        data = reply.data
        if reply.status >= 400:
            code = data.get("code", "error") if isinstance(data, dict) else "error"
            message = data.get("message", "") if isinstance(data, dict) else reply.text
            raise ApiRefused(reply.status, str(code), str(message))
        return data

    def close(self) -> None:
        self._http.close()
