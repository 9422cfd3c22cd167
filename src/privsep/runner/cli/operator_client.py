"""The operator's API client: :class:`~privsep.runner.api.client.SessionClient` opened with the
operator credential, with every failure turned into the one line a person reads.

The session token lives in this process's memory only; nothing about the session is written
to disk, so there is no token file to steal or to leave behind. A failure is a
:class:`CommandError`: what was attempted, on what, then the server's or the OS's reason, and a
hint when there is an obvious next step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlencode

from privsep.runner.api.client import SessionClient, SessionRefused
from privsep.runner.api.keepalive import HttpReply, HttpUnavailable
from privsep.runner.cli.output import one_line
from privsep.runner.errors import CommandError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from privsep.runner.config.loader import Config


class OperatorClient(SessionClient):
    """Calls the operator API with a session opened from the operator credential.

    The key file is read (permission-checked) when a session is opened, not at construction,
    so building a client never touches the key and commands that fail earlier never read it.
    """

    def __init__(
        self,
        url: str | Sequence[str],
        credential: str,
        *,
        audience: str | None = None,
        timeout: float = 10.0,
    ) -> None:
        self.credential = credential
        try:
            # The audience (by default the first URL exactly as configured) is compared with
            # the server's own verbatim; only the request bases are normalised.
            super().__init__(
                url,
                name="operator",
                key=self._load_key,
                session_path="/v1/operator/session",
                audience=audience,
                timeout=timeout,
            )
        except ValueError as exc:
            raise CommandError(f"server.url or server.urls: {exc}") from None

    @classmethod
    def from_config(cls, cfg: Config) -> OperatorClient:
        from privsep.runner.config.endpoints import endpoints

        where = endpoints(cfg)
        return cls(where.urls, str(cfg.path_of("operator.credential")), audience=where.audience)

    @property
    def url(self) -> str:
        """The server URL requests go to now (after a failover, the replica that answered)."""
        return self.base_url

    def __repr__(self) -> str:  # the token never reaches a log through repr()
        return f"OperatorClient(url={self.url!r}, credential={self.credential!r})"

    def __enter__(self) -> OperatorClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _load_key(self) -> Ed25519PrivateKey:
        """The operator key, or a one-line error that says how to get a usable one."""
        from privsep.runner.api.credential import load_credential

        path = self.credential
        return load_credential(
            path,
            role="operator",
            missing_hint=f"create one with `runner credentials create --out {path}` and "
            f"register its .pub with `runner operators register NAME --public-key {path}.pub` "
            "on the server host (or set operator.credential)",
        )

    def call(
        self,
        method: str,
        path: str,
        *,
        what: str | None = None,
        body: Any = None,
        params: dict[str, Any] | None = None,
        missing_ok: bool = False,
    ) -> Any:
        """One authenticated call; the parsed JSON body on success.

        ``what`` completes "cannot ..." in the error message (``"trigger workflow 'etl'"``;
        by default the method and path). With ``missing_ok`` a 404 returns None instead of
        failing.
        """
        what = what or f"{method} {path}"
        query = {k: v for k, v in (params or {}).items() if v is not None}
        try:
            reply = self.send(method, f"{path}?{urlencode(query)}" if query else path, body)
        except HttpUnavailable as exc:
            raise self._unreachable(exc) from None
        except SessionRefused as exc:
            raise self._no_session(exc.reply) from None
        status, data = reply.status, reply.data
        if 200 <= status < 300:
            return data
        if status == 404 and missing_ok:
            return None
        _, message = _error_of(status, data)
        if status == 401:
            raise CommandError(f"cannot {what}: the server refused the operator session: {message}")
        if status == 403:
            raise CommandError(f"cannot {what}: forbidden: {message}")
        if status in (400, 422):
            raise CommandError(f"cannot {what}: the server rejected the request: {message}")
        if status in (404, 409):
            raise CommandError(f"cannot {what}: {message}")
        if status == 503 and reply.retry_after is not None:
            raise CommandError(f"cannot {what}: {_unavailable_text(message, reply)}")
        raise CommandError(f"cannot {what}: {_status_text(status, message)}")

    def _unreachable(self, exc: HttpUnavailable) -> CommandError:
        if exc.timed_out:
            return CommandError(
                f"the server at {self.url} did not answer {exc.request.split('?')[0]} within "
                f"{self.timeout:g} s (is `runner server` overloaded or stuck?)"
            )
        return CommandError(
            f"cannot reach the server at {self.url}: {exc.reason} "
            "(is `runner server` running? check server.url and server.urls)"
        )

    def _no_session(self, reply: HttpReply) -> CommandError:
        code, message = _error_of(reply.status, reply.data)
        where = f"cannot open an operator session with the server at {self.url}"
        if code == "no_operator_key":
            return CommandError(
                f"{where}: {message} (on the server host: `runner operators register NAME "
                f"--public-key {self.credential}.pub`)"
            )
        if code == "unknown_operator":
            return CommandError(
                f"{where}: the server refused the credential {self.credential}: {message} "
                "(`runner operators list` on the server host shows the registered keys)"
            )
        if code == "bad_audience":
            return CommandError(
                f"{where}: {message} (server.audience, or else server.url, must be the same "
                "here as on the server)"
            )
        if reply.status == 503 and reply.retry_after is not None:
            return CommandError(f"{where}: {_unavailable_text(message, reply)}")
        if reply.status == 401:
            return CommandError(
                f"{where}: the server refused the credential {self.credential}: {message}"
            )
        return CommandError(f"{where}: {_status_text(reply.status, message)}")


def _error_of(status: int, body: Any) -> tuple[str, str]:
    """The server's ``{"code", "message"}``, or stand-ins when the body is not ours."""
    if isinstance(body, dict):
        return str(body.get("code", "error")), one_line(str(body.get("message", "")))
    return "error", f"HTTP {status} without an error body"


def _unavailable_text(message: str, reply: HttpReply) -> str:
    """A 503 with ``Retry-After``: the server is up but cannot serve now (its database is
    away); nothing was done, and the same command may be run again."""
    return f"{message} (HTTP 503; the server asks to retry after {reply.retry_after:g} s)"


def _status_text(status: int, message: str) -> str:
    if status >= 500:
        return f"the server failed (HTTP {status}): {message} (see the `runner server` log)"
    return f"HTTP {status}: {message}"


def seg(value: str) -> str:
    """One URL path segment; ``.`` and ``..`` are encoded so no layer resolves them."""
    encoded = quote(value, safe="")
    return encoded.replace(".", "%2E") if set(value) <= {"."} else encoded
