"""The client: one work item's access to the API, from inside its sandbox.

The sandbox's environment carries one thing, ``PRIVSEP_CREDENTIAL_SOCKET``: the path of the
supervisor's socket for this sandbox. When ``PRIVSEP_API_URL`` is set too (the network policy
lets the sandbox reach the API) the client fetches the short-lived token from the socket and
calls the API itself; otherwise every call travels through the socket and the supervisor makes
it, so the child never holds a token at all.

Idempotent calls (``GET``, ``PUT``, ``DELETE``) are retried with jittered exponential backoff
when the API is unavailable. A ``POST`` changes state (succeed, fail, defer, fire) and is
retried only when the request certainly never left this process, with one exception: an
outcome report (the sandbox surface's ``REPORT`` rows) is retried across an outage for up to
:data:`REPORT_RETRY_SECONDS`, sent or not, because the server applies a report once and answers
its repeat with the original answer. Giving up on a report would make the supervisor report
the item failed, and a task whose code had finished would run again.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any, Final
from urllib.parse import quote

from privsep.client._exceptions import (
    APIError,
    BadRequest,
    ClientClosed,
    Conflict,
    ConnectionLost,
    NotFound,
    NotInSandbox,
    NotPermitted,
    ProtocolError,
    ServerUnavailable,
    Unauthorized,
)
from privsep.client._models import Connection
from privsep.client._surface import REPORT_CALLS
from privsep.client._transport import (
    ProxyTransport,
    SocketChannel,
    TokenSource,
    Transport,
)

SOCKET_ENV: Final = "PRIVSEP_CREDENTIAL_SOCKET"
API_URL_ENV: Final = "PRIVSEP_API_URL"
DEFAULT_TIMEOUT: Final = 10.0
DEFAULT_RETRIES: Final = 3
IDEMPOTENT: Final = frozenset({"GET", "PUT", "DELETE"})
# How long an outcome report keeps trying through an outage (a replica restart, a database
# failover) before the sandbox gives up and the supervisor reports the item failed.
REPORT_RETRY_SECONDS: Final = 120.0
_MAX_BACKOFF = 5.0

log = logging.getLogger("privsep.client")

_ERRORS: dict[int, type[APIError]] = {
    400: BadRequest,
    401: Unauthorized,
    403: NotPermitted,
    404: NotFound,
    409: Conflict,
    413: BadRequest,
    422: BadRequest,
}


def _segment(value: str, what: str) -> str:
    """``value`` as one URL path segment; refuses what no route could match."""
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a string, not {type(value).__name__}")
    if value in ("", ".", "..") or "/" in value:
        raise ValueError(f"{what} {value!r} cannot be used: it is empty, '.', '..' or has a '/'")
    return quote(value, safe="")


class Client:
    """One sandbox's connection to the API. Workflow code normally uses it through
    :class:`~privsep.client.Context`; the parse, task and trigger entry points use it directly.

    All arguments are keyword-only. ``socket_path`` defaults to ``$PRIVSEP_CREDENTIAL_SOCKET``
    and ``api_url`` to ``$PRIVSEP_API_URL`` (unset or empty: go through the socket). A
    ``transport`` replaces both, for tests. ``timeout`` bounds each call, ``retries`` how often
    an idempotent call is tried again.

    Use it as a context manager or call :meth:`close`; a closed client cannot be reused.
    """

    def __init__(
        self,
        *,
        socket_path: str | None = None,
        api_url: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        retries: int = DEFAULT_RETRIES,
        backoff: float = 0.25,
        transport: Transport | None = None,
    ) -> None:
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        if retries < 0:
            raise ValueError("retries must be zero or more")
        self._timeout = float(timeout)
        self._retries = retries
        self._backoff = backoff
        self._closed = False
        self._lock = threading.Lock()
        self._channel: SocketChannel | None = None
        if transport is not None:
            self._transport: Transport = transport
            return
        path = socket_path if socket_path is not None else os.environ.get(SOCKET_ENV, "")
        if not path:
            raise NotInSandbox(
                f"privsep: ${SOCKET_ENV} is not set, so this code is not running in a privsep "
                "sandbox; workflow code can reach the API only when a privsep supervisor runs it"
            )
        self._channel = SocketChannel(path)
        url = api_url if api_url is not None else os.environ.get(API_URL_ENV, "")
        if url:
            from privsep.client._http import HTTPTransport  # requests is heavy: only when used

            tokens = TokenSource(self._channel, timeout=self._timeout)
            self._transport = HTTPTransport(url, tokens)
        else:
            self._transport = ProxyTransport(self._channel)

    # --- lifecycle ----------------------------------------------------------------------------

    def __enter__(self) -> Client:
        self._check_open()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Release the socket and HTTP connections. Closing twice is harmless."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._transport.close()
        if self._channel is not None:
            self._channel.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise ClientClosed("cannot reuse a privsep client once it has been closed")

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<Client {state} via {self._transport!r}>"

    # --- one call -----------------------------------------------------------------------------

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        """Make one API call; return the JSON body of a 2xx or raise the typed error."""
        self._check_open()
        attempt = 0
        report = (method, path) in REPORT_CALLS
        give_up = time.monotonic() + REPORT_RETRY_SECONDS
        while True:
            try:
                status, data = self._transport.request(method, path, body, timeout=self._timeout)
                if status >= 500:
                    raise ServerUnavailable(
                        f"{method} {path}: the API answered HTTP {status}{_detail(data)}",
                        status=status,
                    )
                break
            except (ServerUnavailable, ConnectionLost) as exc:
                not_sent = isinstance(exc, ServerUnavailable) and not exc.request_sent
                delay = self._delay(attempt)
                if report:
                    if time.monotonic() + delay > give_up:
                        raise
                elif attempt >= self._retries or not (method in IDEMPOTENT or not_sent):
                    raise
                log.warning("%s; trying again in %.2f s", exc, delay)
                time.sleep(delay)
                attempt += 1
        if 200 <= status < 300:
            return data
        error = _ERRORS.get(status)
        code = data.get("code") if isinstance(data, dict) else None
        message = data.get("message") if isinstance(data, dict) else None
        if error is None:
            raise ProtocolError(f"{method} {path}: unexpected HTTP {status} from the API")
        raise error(
            f"{method} {path}: {message or 'refused'}",
            status=status,
            code=str(code or "unknown"),
        )

    def _delay(self, attempt: int) -> float:
        import random  # only on the slow path

        base = min(self._backoff * (2**attempt), _MAX_BACKOFF)
        return float(base * (0.5 + random.random() / 2))  # noqa: S311 - jitter, not crypto

    # --- task -----------------------------------------------------------------------------

    def task_context(self) -> dict[str, Any]:
        """The running attempt: ``attempt_id``, ``run_id``, ``workflow_id``, ``task_id``,
        ``try_number``, ``params`` and ``trigger_event``."""
        return dict(self._call("GET", "/v1/task/context"))

    def heartbeat(self) -> None:
        self._call("POST", "/v1/task/heartbeat", {})

    def succeed(self, return_value: Any = None) -> str:
        """End the attempt successfully; a non-``None`` value becomes its ``return_value``
        XCom. Returns the attempt's new state."""
        return str(self._call("POST", "/v1/task/succeed", {"return_value": return_value})["state"])

    def fail(self, error: str) -> str:
        """Fail the attempt for good, whatever its retries say."""
        return str(self._call("POST", "/v1/task/fail", {"error": _clip(error)})["state"])

    def retry(self, error: str) -> str:
        """Fail this try; the server queues another if the task has retries left."""
        return str(self._call("POST", "/v1/task/retry", {"error": _clip(error)})["state"])

    def defer(self, trigger: dict[str, Any], *, timeout: float | None = None) -> str:
        """Park the attempt on ``trigger`` (``{"module", "qualname", "kwargs"}``)."""
        body = {"trigger": trigger, "timeout": timeout}
        return str(self._call("POST", "/v1/task/defer", body)["state"])

    def get_variable(self, key: str) -> str:
        path = f"/v1/task/variables/{_segment(key, 'variable key')}"
        return str(self._call("GET", path)["value"])

    def set_variable(self, key: str, value: str) -> None:
        if not isinstance(value, str):
            raise TypeError(f"variable values are strings, not {type(value).__name__}")
        self._call("PUT", f"/v1/task/variables/{_segment(key, 'variable key')}", {"value": value})

    def delete_variable(self, key: str) -> None:
        self._call("DELETE", f"/v1/task/variables/{_segment(key, 'variable key')}")

    def get_connection(self, conn_id: str) -> Connection:
        body = self._call("GET", f"/v1/task/connections/{_segment(conn_id, 'connection id')}")
        return Connection.from_api(body)

    def xcom_push(self, key: str, value: Any) -> None:
        self._call("PUT", f"/v1/task/xcoms/{_segment(key, 'XCom key')}", {"value": value})

    def xcom_pull(self, task_id: str, key: str = "return_value") -> Any:
        path = f"/v1/task/xcoms/{_segment(task_id, 'task id')}/{_segment(key, 'XCom key')}"
        return self._call("GET", path)["value"]

    # --- parse and trigger ----------------------------------------------------------------

    def submit_parse_result(
        self, workflows: list[dict[str, Any]], *, error: str | None = None
    ) -> None:
        """Store what this parse job found: workflow definitions, or an import error."""
        body: dict[str, Any] = {"workflows": workflows}
        if error is not None:
            body["error"] = _clip(error)
        self._call("POST", "/v1/parse/result", body)

    def assigned_triggers(self) -> list[dict[str, Any]]:
        """This batch's triggers: ``[{"id", "module", "qualname", "kwargs"}, ...]``."""
        return list(self._call("GET", "/v1/trigger/assigned")["triggers"])

    def fire_trigger(self, trigger_id: str, payload: Any) -> None:
        """The trigger's event: its deferred task is queued again with ``payload``."""
        tid = _segment(trigger_id, "trigger id")
        self._call("POST", f"/v1/trigger/{tid}/event", {"payload": payload})

    def fail_trigger(self, trigger_id: str, error: str) -> None:
        """The trigger raised: its task fails (or retries)."""
        tid = _segment(trigger_id, "trigger id")
        self._call("POST", f"/v1/trigger/{tid}/failure", {"error": _clip(error)})


def connect(
    *,
    timeout: float = DEFAULT_TIMEOUT,
    retries: int = DEFAULT_RETRIES,
) -> Client:
    """A :class:`Client` for this sandbox, configured from its environment; raises
    :class:`NotInSandbox` when there is no credential socket."""
    return Client(timeout=timeout, retries=retries)


_MAX_ERROR = 65536


def _clip(text: str) -> str:
    """Error texts are capped by the API; keep the end, where the exception is."""
    return text if len(text) <= _MAX_ERROR else "...\n" + text[-(_MAX_ERROR - 4) :]


def _detail(data: Any) -> str:
    if isinstance(data, dict) and isinstance(data.get("message"), str):
        return f": {data['message'][:300]}"
    return ""
