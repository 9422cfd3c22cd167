"""The one API client of the trusted callers: signed assertion → session token → calls.

The supervisor, the operator commands and ``runner standalone`` all hold a long-lived Ed25519
key and call the server the same way: a fresh single-use assertion (30 s at most) signed by
the key buys a short session token; the token is renewed before it runs out, and a 401 opens a
new session and sends the request once more (the session may have expired on the way, or a
restarted server may have rotated its signing keys). That flow lives here once; what each
caller makes of a status (an exception to retry on, a one-line error for a person) stays with
the caller. Several server URLs (replicas) are tried in turn by
:class:`~privsep.runner.api.failover.FailoverClient`; the assertion's audience is the service's
one name, never the URL it happens to go to, so a session opened anywhere works everywhere.

The session token stays in this process's memory, in a :class:`~privsep._token.Token`, and is
revealed only where the ``Authorization`` header is written.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from privsep._token import Token
from privsep.runner.api.failover import FailoverClient
from privsep.runner.api.keepalive import HttpReply

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from privsep.runner.api.token_file import SharedSession

__all__ = ["ASSERTION_TTL", "RENEW_AT_REMAINING", "SessionClient", "SessionRefused"]

# Assertions are single-use and short; 30 s is plenty for one round trip.
ASSERTION_TTL = 30
# Renew when less than this share of the session's life is left, so a request never leaves
# with a token that expires on the way.
RENEW_AT_REMAINING = 0.3


class SessionRefused(Exception):
    """The server answered the session request without a session; ``reply`` says why."""

    def __init__(self, reply: HttpReply) -> None:
        super().__init__(f"no session: HTTP {reply.status}")
        self.reply = reply


@dataclass(frozen=True)
class _Session:
    token: Token
    issued_at: float

    def due(self, now: float) -> bool:
        life = max(1.0, self.token.expires_at - self.issued_at)
        return self.token.expires_at - now < life * RENEW_AT_REMAINING


class SessionClient:
    """Calls the API under a session opened with a signed assertion. Thread-safe.

    ``key`` is called each time a session is opened, so a caller can read its key file only
    when it is needed (and report a bad one its own way). A supervisor behind
    ``runner token-refresher`` has no key: ``shared`` is the file the refresher keeps its
    session in, read instead of signing an assertion, again when it changes, and again on a
    401 (then a token the server refused is no session). ``urls`` is one base URL or several
    replicas' in the order to try them. ``audience`` defaults to the first URL as given: the
    server compares it with its own audience (``server.audience``, else ``server.url``)
    verbatim. Raises
    :class:`~privsep.runner.api.keepalive.HttpUnavailable` when the server gives no answer and
    :class:`SessionRefused` when it gives no session; any other status is returned.
    """

    def __init__(
        self,
        urls: str | Sequence[str],
        *,
        name: str,
        key: Callable[[], Ed25519PrivateKey] | None,
        session_path: str,
        audience: str | None = None,
        timeout: float = 10.0,
        unix_socket: str | None = None,
        shared: SharedSession | None = None,
    ) -> None:
        given = (urls,) if isinstance(urls, str) else tuple(urls)
        if (key is None) == (shared is None):
            raise ValueError("a session needs a key or a shared session file, not both")
        self.name = name
        self.audience = audience or (given[0] if given else "")
        self.timeout = timeout
        self._key = key
        self._shared = shared
        self._session_path = session_path
        # One kept connection per calling thread and URL; see keepalive.py for why not
        # requests, and failover.py for when it moves to the next URL.
        self._http = FailoverClient(
            [url.rstrip("/") for url in given], timeout=timeout, unix_socket=unix_socket
        )
        self._lock = threading.Lock()
        self._session: _Session | None = None

    def __repr__(self) -> str:  # the token never reaches a log through repr()
        return f"{type(self).__name__}(name={self.name!r}, url={self.base_url!r})"

    @property
    def base_url(self) -> str:
        """The server URL requests go to now (it changes on failover)."""
        return self._http.base_url

    @property
    def urls(self) -> tuple[str, ...]:
        return self._http.urls

    def new_session(self) -> dict[str, Any]:
        """Exchange a fresh assertion for a session token; the server's answer."""
        return self._open()[1]

    def session_token(self) -> Token | None:
        """The session token held now (for ``runner token-refresher``, which passes it on)."""
        with self._lock:
            return self._session.token if self._session else None

    def _open(self, refused: Token | None = None) -> tuple[Token, dict[str, Any]]:
        if self._shared is not None:
            token, body = self._shared.read(refused=refused)
            with self._lock:
                self._session = _Session(token, time.time())
            return token, body
        from privsep.secrets.tokens import create_assertion

        assert self._key is not None  # noqa: S101 - one of the two, checked in __init__
        assertion = create_assertion(
            self._key(),
            supervisor_name=self.name,
            audience=self.audience,
            ttl_seconds=ASSERTION_TTL,
        )
        reply = self._http.request("POST", self._session_path, {"assertion": assertion})
        body = reply.data
        if (
            reply.status != 200
            or not isinstance(body, dict)
            or not isinstance(body.get("token"), str)
        ):
            raise SessionRefused(reply)
        token = Token(body["token"], int(body.get("expires_at", 0)))
        with self._lock:
            self._session = _Session(token, time.time())
        return token, body

    def session_due(self) -> bool:
        """True when there is no session or it is close enough to its end to renew."""
        with self._lock:
            session = self._session
        return session is None or session.due(time.time()) or self._shared_changed()

    def _shared_changed(self) -> bool:
        return self._shared is not None and self._shared.changed()

    def _token(self) -> Token:
        with self._lock:
            session = self._session
        if session is None or self._shared_changed():
            return self._open()[0]
        now = time.time()
        # Behind a refresher, a token near its end is still used until it expires (the
        # refresher renews it; a changed file was read above).
        if session.due(now) if self._shared is None else session.token.expires_at <= now:
            return self._open()[0]
        return session.token

    def send(self, method: str, path: str, body: Any = None) -> HttpReply:
        """One authenticated request; a 401 opens a new session and sends it once more.

        A 401 means the server did not act on the request, so sending it again is safe even
        for a POST.
        """
        sent = self._token()
        reply = self._http.request(method, path, body, token=sent.reveal())
        if reply.status != 401:
            return reply
        token, _ = self._open(refused=sent)
        return self._http.request(method, path, body, token=token.reveal())

    def close(self) -> None:
        """Close the connections and forget the session."""
        with self._lock:
            self._session = None
        self._http.close()
