"""Direct HTTP to the API, over TCP or the server's unix socket, with ``requests``.

Imported only when ``PRIVSEP_API_URL`` is set (a sandbox whose network policy allows the
API), because ``requests`` alone costs more import time than the rest of the SDK.

Accepted API URLs:

* ``http://host:port`` or ``https://host:port`` (an optional path prefix is kept);
* ``http+unix://<percent-encoded socket path>``, e.g. ``http+unix://%2Frun%2Fprivsep%2Fapi.sock``;
* ``unix:///run/privsep/api.sock``.

The session ignores the environment (``trust_env = False``): no ``HTTP_PROXY``, no ``.netrc``,
so the token goes only to the API it was built for; redirects are not followed for the same
reason. The token is read from the credential socket and put in one request's header, never
in the session's defaults.
"""

from __future__ import annotations

import http.client
from typing import Any
from urllib.parse import unquote, urlsplit

import requests
import requests.adapters
from requests.structures import CaseInsensitiveDict
from requests.utils import get_encoding_from_headers

from privsep._token import Token
from privsep.client._exceptions import ProtocolError, ServerUnavailable
from privsep.client._transport import TokenSource
from privsep.client._unixhttp import UnixHTTPConnection

_UNIX_BASE = "http+unix://privsep-api"


class _ConnectFailed(requests.exceptions.ConnectionError):
    """The unix socket could not be connected: the request was never sent."""


class UnixAdapter(requests.adapters.BaseAdapter):
    """A ``requests`` adapter speaking HTTP/1.1 over one unix socket, with ``http.client``.

    One connection per request: connecting a local socket is cheap, and nothing is pooled
    that could outlive the client.
    """

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path

    def send(
        self,
        request: requests.PreparedRequest,
        stream: bool = False,
        timeout: float | tuple[float | None, float | None] | None = None,
        verify: bool | str = True,
        cert: bytes | str | tuple[bytes | str, bytes | str] | None = None,
        proxies: Any = None,
    ) -> requests.Response:
        read_timeout = timeout[1] if isinstance(timeout, tuple) else timeout
        conn = UnixHTTPConnection(self.path, timeout=read_timeout)
        try:
            try:
                conn.connect()
            except OSError as exc:
                raise _ConnectFailed(
                    f"cannot connect to {self.path}: {exc.strerror or exc}", request=request
                ) from None
            try:
                body: Any = request.body
                conn.request(
                    str(request.method),
                    request.path_url,
                    body=body,
                    headers=dict(request.headers),
                )
                raw = conn.getresponse()
                content = raw.read()
            except TimeoutError:
                raise requests.exceptions.ReadTimeout(
                    f"no answer from {self.path} within {read_timeout} s", request=request
                ) from None
            except (OSError, http.client.HTTPException) as exc:
                raise requests.exceptions.ConnectionError(
                    f"{self.path}: {exc}", request=request
                ) from None
        finally:
            conn.close()
        response = requests.Response()
        response.status_code = raw.status
        response.reason = raw.reason
        response.headers = CaseInsensitiveDict(raw.getheaders())
        response._content = content
        response.encoding = get_encoding_from_headers(response.headers)
        response.url = str(request.url)
        response.request = request
        return response

    def close(self) -> None:
        pass


def _never_sent(exc: requests.exceptions.RequestException) -> bool:
    """True when the connection could not be opened, so the server never saw the request."""
    if isinstance(exc, (_ConnectFailed, requests.exceptions.ConnectTimeout)):
        return True
    seen: set[int] = set()
    todo: list[object] = [exc]
    while todo:
        item = todo.pop()
        if id(item) in seen or item is None:
            continue
        seen.add(id(item))
        # urllib3's NewConnectionError, named rather than imported: the client imports only
        # the standard library and requests.
        if type(item).__name__ == "NewConnectionError":
            return True
        if isinstance(item, BaseException):
            todo += [*item.args, item.__cause__, item.__context__, getattr(item, "reason", None)]
    return False


def _split_api_url(url: str) -> tuple[str, str | None]:
    """``(base URL to prefix paths with, unix socket path or None)``."""
    parts = urlsplit(url)
    if parts.scheme in ("http", "https") and parts.netloc:
        return url.rstrip("/"), None
    if parts.scheme == "http+unix" and parts.netloc:
        return _UNIX_BASE + parts.path.rstrip("/"), unquote(parts.netloc)
    if parts.scheme == "unix" and parts.path.startswith("/") and not parts.netloc:
        return _UNIX_BASE, parts.path
    raise ValueError(
        f"API URL {url!r} is not http(s)://host:port, http+unix://<%-encoded socket path> "
        "or unix:///path/to/socket"
    )


class HTTPTransport:
    """Calls the API itself, with the token from the credential socket.

    A ``401`` with code ``expired`` makes it ask the supervisor for a fresh token and send the
    request once more: a 401 means the server did not act on the request, so this is safe
    even for ``POST``.
    """

    def __init__(self, api_url: str, tokens: TokenSource) -> None:
        self._base, unix_path = _split_api_url(api_url)
        self._unix_path = unix_path
        self._tokens = tokens
        self._session = requests.Session()
        self._session.trust_env = False
        if unix_path is not None:
            self._session.mount(_UNIX_BASE, UnixAdapter(unix_path))

    def request(self, method: str, path: str, body: Any, *, timeout: float) -> tuple[int, Any]:
        token = self._tokens.get()
        status, data = self._send(method, path, body, token, timeout)
        if status == 401 and isinstance(data, dict) and data.get("code") == "expired":
            fresh = self._tokens.get(force=True)
            if fresh.reveal() != token.reveal():
                status, data = self._send(method, path, body, fresh, timeout)
        return status, data

    def _send(
        self, method: str, path: str, body: Any, token: Token, timeout: float
    ) -> tuple[int, Any]:
        where = f"{method} {path}"
        try:
            resp = self._session.request(
                method,
                self._base + path,
                json=body,
                headers={"Authorization": "Bearer " + token.reveal(), "Accept": "application/json"},
                timeout=timeout,
                allow_redirects=False,
            )
        except requests.exceptions.Timeout as exc:
            raise ServerUnavailable(
                f"{where}: the API did not answer within {timeout:g} s",
                request_sent=not _never_sent(exc),
            ) from None
        except requests.exceptions.RequestException as exc:
            raise ServerUnavailable(
                f"{where}: cannot reach the API: {_reason(exc)}", request_sent=not _never_sent(exc)
            ) from None
        if not resp.content:
            return resp.status_code, None
        try:
            return resp.status_code, resp.json()
        except ValueError:
            if resp.status_code >= 500:
                return resp.status_code, None
            raise ProtocolError(
                f"{where}: the API answered HTTP {resp.status_code} with a body that is not JSON"
            ) from None

    def close(self) -> None:
        self._session.close()

    def __repr__(self) -> str:
        target = self._unix_path if self._unix_path is not None else self._base
        return f"HTTPTransport({target!r}, tokens={self._tokens!r})"


def _reason(exc: BaseException) -> str:
    text = str(exc)
    return text if len(text) <= 300 else text[:300] + "..."
