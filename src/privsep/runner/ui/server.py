"""The HTTP side of ``runner ui``: a loopback-only, read-only server with a one-time token.

Who may look, in order of the checks every request passes:

1. The ``Host`` header must name this listener (``127.0.0.1:PORT`` or ``localhost:PORT``):
   a page on another site that rebinds its own name to 127.0.0.1 (DNS rebinding) sends its
   own name, and is refused.
2. Only GET: the page changes nothing, so anything else is a 405.
3. The URL printed at start carries a one-time token. The first request that presents it
   (compared in constant time) gets a session cookie (HttpOnly, SameSite=Strict) and a
   redirect to the same page without the token, so it leaves the address bar and the
   history. The token is spent then: a second client with it gets a 403, as does anyone with
   neither token nor cookie.

Every answer carries a Content-Security-Policy that allows this page's own stylesheet and
script only, and forbids framing, referrers and caching. Requests are not logged: the first
one carries the token in its query string.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import secrets
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

from privsep.runner.cli.operator_client import OperatorClient
from privsep.runner.errors import EXIT_USAGE, CommandError
from privsep.runner.ui import pages
from privsep.runner.ui.assets import ASSETS
from privsep.runner.ui.markup import Html, esc, join, link, tag

COOKIE = "privsep_ui"
TOKEN_PARAM = "token"  # noqa: S105 - the query parameter's name, not a secret

SECURITY_HEADERS = (
    (
        "Content-Security-Policy",
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    ),
    ("X-Frame-Options", "DENY"),
    ("Referrer-Policy", "no-referrer"),
    ("Cache-Control", "no-store"),
    ("X-Content-Type-Options", "nosniff"),
    ("Cross-Origin-Opener-Policy", "same-origin"),
    ("Cross-Origin-Resource-Policy", "same-origin"),
)

# A slow or silent client holds one thread at most this long.
REQUEST_TIMEOUT = 30.0


def loopback(bind: str) -> str:
    """``bind`` as a loopback address, or a usage error: the page shows the operator's view
    of the whole installation to whoever reaches it, so it never listens on a network."""
    address = "127.0.0.1" if bind == "localhost" else bind
    try:
        ip = ipaddress.ip_address(address.strip("[]"))
    except ValueError:
        raise CommandError(
            f"--bind {bind} is not an IP address (use 127.0.0.1 and reach it from afar "
            "with `ssh -L`)",
            EXIT_USAGE,
        ) from None
    if not ip.is_loopback:
        raise CommandError(
            f"--bind {bind} is not a loopback address: the status page listens on 127.0.0.1 "
            "or ::1 only (reach it from another host with `ssh -L`)",
            EXIT_USAGE,
        )
    return str(ip)


class _Access:
    """The one-time token and the sessions it was exchanged for."""

    def __init__(self) -> None:
        self.token = secrets.token_urlsafe(32)
        self._spent = False
        # Digests of the session ids: a lookup compares digests in constant time, and the
        # ids themselves are kept only by the browser.
        self._sessions: list[bytes] = []
        self._lock = threading.Lock()

    def redeem(self, given: str) -> str | None:
        """A new session id for the token, once; None for a wrong or spent token."""
        with self._lock:
            right = hmac.compare_digest(given.encode(), self.token.encode())
            if self._spent or not right:
                return None
            self._spent = True
            session = secrets.token_urlsafe(32)
            self._sessions.append(hashlib.sha256(session.encode()).digest())
            return session

    def admits(self, session: str | None) -> bool:
        if not session:
            return False
        digest = hashlib.sha256(session.encode()).digest()
        with self._lock:
            known = list(self._sessions)
        return any(hmac.compare_digest(digest, s) for s in known)


class StatusPage(ThreadingHTTPServer):
    """The page's server: one listener on a loopback address, one thread per connection."""

    daemon_threads = True

    def __init__(self, client: OperatorClient, host: str, port: int) -> None:
        self.client = client
        self.access = _Access()
        if ipaddress.ip_address(host).version == 6:
            self.address_family = socket.AF_INET6
        try:
            super().__init__((host, port), _Handler)
        except OSError as exc:
            raise CommandError(f"cannot listen on {host} port {port}: {exc.strerror}") from None
        bound = self.server_address[1]
        shown = f"[{host}]" if ":" in host else host
        self.origin = f"http://{shown}:{bound}"
        self.hosts = frozenset({f"{shown}:{bound}", f"localhost:{bound}"})

    @property
    def url(self) -> str:
        """Where to point the browser: the origin with the one-time token."""
        return f"{self.origin}/?{urlencode({TOKEN_PARAM: self.access.token})}"


class _Handler(BaseHTTPRequestHandler):
    server: StatusPage
    server_version = "privsep-ui"
    sys_version = ""
    protocol_version = "HTTP/1.1"
    timeout = REQUEST_TIMEOUT

    def log_message(self, format: str, *args: Any) -> None:
        """Say nothing per request: the first one's query string holds the token."""

    def __getattr__(self, name: str) -> Any:
        # Every method but GET (the base class answers 501 for one without a do_ method).
        if name.startswith("do_"):
            return self._not_allowed
        raise AttributeError(name)

    def do_GET(self) -> None:
        if not self._host_ok():
            self._send_text(403, "this page answers only at " + self.server.origin)
            return
        parts = urlsplit(self.path)
        query = dict(parse_qsl(parts.query, keep_blank_values=True))
        session = self._cookie()
        admitted = self.server.access.admits(session)
        if TOKEN_PARAM in query:
            if not admitted:
                session = self.server.access.redeem(query[TOKEN_PARAM])
                if session is None:
                    self._send_text(403, "this token is wrong or was used already")
                    return
            del query[TOKEN_PARAM]
            self._redirect(parts.path + (f"?{urlencode(query)}" if query else ""), session)
            return
        if not admitted:
            self._send_text(403, "open the URL that `runner ui` printed (its token works once)")
            return
        self._serve(parts.path, query)

    def _not_allowed(self) -> None:
        if not self._host_ok():
            self._send_text(403, "this page answers only at " + self.server.origin)
            return
        # The request's body is not read, so the connection cannot carry another request.
        self.close_connection = True
        self._send_text(
            405, "this page is read-only: GET only", ("Allow", "GET"), ("Connection", "close")
        )

    def _host_ok(self) -> bool:
        return (self.headers.get("Host") or "").lower() in self.server.hosts

    def _cookie(self) -> str | None:
        from http.cookies import CookieError, SimpleCookie

        jar: SimpleCookie = SimpleCookie()
        try:
            jar.load(self.headers.get("Cookie") or "")
        except CookieError:
            return None
        morsel = jar.get(COOKIE)
        return morsel.value if morsel else None

    def _serve(self, path: str, query: dict[str, str]) -> None:
        asset = ASSETS.get(path)
        if asset is not None:
            self._send(200, asset[0], asset[1])
            return
        found = pages.find(path)
        if found is None:
            self._page(pages.Page("Not found", tag("p", "no such page"), 404))
            return
        view, params = found
        try:
            answer = view(self.server.client, params, query)
        except CommandError as exc:
            answer = pages.Page("The server did not answer", tag("p", exc, class_="error"), 502)
        except Exception as exc:  # a bug here must not end the page, nor show a traceback
            print(f"runner ui: {path}: {type(exc).__name__}: {exc}", file=sys.stderr)
            answer = pages.Page("Error", tag("p", "this page failed; see runner ui's output"), 500)
        if isinstance(answer, pages.Json):
            self._send(answer.status, "application/json", json.dumps(answer.data).encode())
        else:
            self._page(answer)

    def _page(self, page: pages.Page) -> None:
        nav = join(link(href, text) for href, text in pages.NAV)
        scripts = join(Html(f'<script src="{esc(src)}"></script>') for src in page.scripts)
        document = (
            '<!doctype html><html lang="en"><head><meta charset="utf-8">'
            f"<title>privsep · {esc(page.title)}</title>"
            '<link rel="stylesheet" href="/static/ui.css"></head><body>'
            f"{tag('nav', nav)}<main>{tag('h1', page.title)}{page.body}</main>{scripts}"
            "</body></html>"
        )
        self._send(page.status, "text/html; charset=utf-8", document.encode())

    def _redirect(self, location: str, session: str | None) -> None:
        extra = [("Location", location or "/")]
        if session:
            extra.append(("Set-Cookie", f"{COOKIE}={session}; HttpOnly; SameSite=Strict; Path=/"))
        self._send(303, "text/plain; charset=utf-8", b"", *extra)

    def _send_text(self, status: int, text: str, *extra: tuple[str, str]) -> None:
        self._send(status, "text/plain; charset=utf-8", (text + "\n").encode(), *extra)

    def _send(self, status: int, kind: str, body: bytes, *extra: tuple[str, str]) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (*SECURITY_HEADERS, *extra):
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)
