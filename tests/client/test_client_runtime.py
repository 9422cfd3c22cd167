"""The client runtime and ``Context`` against a real server, in each of the three ways a
sandbox reaches it: through the credential socket's proxy, directly over TCP, and directly
over the server's unix socket (with the token fetched from the credential socket)."""

from __future__ import annotations

import base64
import json
import logging
import socket
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from client_kit import LiveServer, StandInSupervisor, Work

from privsep.client import (
    BadRequest,
    Client,
    ClientClosed,
    Conflict,
    ConnectionLost,
    Context,
    FrameTooLarge,
    MockTransport,
    NotFound,
    NotInSandbox,
    NotPermitted,
    ProtocolError,
    Refused,
    ServerUnavailable,
    Unauthorized,
    _wire,
    connect,
)
from privsep.secrets.tokens import issue_token

MODES = [None, "tcp", "unix"]
MODE_IDS = ["proxy", "direct-tcp", "direct-unix"]

Serve = Callable[..., StandInSupervisor]


def _task(task_id: str, *upstream: str) -> dict[str, Any]:
    return {
        "task_id": task_id,
        "upstream": list(upstream),
        "module": "defs",
        "qualname": task_id,
    }


def start_attempt(server: LiveServer, conf: dict[str, Any] | None = None) -> tuple[str, Work]:
    """A run of ``ctxwf`` whose first task is claimed, as a supervisor would."""
    server.define(
        {
            "workflow_id": "ctxwf",
            "schedule": None,
            "tasks": [_task("producer"), _task("consumer", "producer")],
        }
    )
    run_id = server.trigger_run("ctxwf", conf)
    return run_id, server.claim("task")


def grant_and_seed(server: LiveServer) -> None:
    server.grant("ctxwf", "variable", "cfg_*")
    server.grant("ctx*", "connection", "warehouse")
    server.put_variable("cfg_target", "tbl")
    server.put_connection(
        "warehouse",
        conn_type="postgres",
        host="db.example",
        port=5432,
        login="etl",
        password="hunter2",
        schema="public",
        extra='{"sslmode": "require"}',
    )
    server.put_connection("elsewhere", conn_type="http", host="x")
    server.put_variable("secret_key", "nope")


@pytest.mark.parametrize("api", MODES, ids=MODE_IDS)
def test_every_context_method_against_the_real_server(
    live_server: LiveServer, credential_socket: Serve, api: str | None
) -> None:
    grant_and_seed(live_server)
    run_id, work = start_attempt(live_server, conf={"day": "2024-01-01"})
    stand_in = credential_socket(work, api=api)

    with connect() as client:
        ctx = Context(client=client, info=client.task_context())
        assert (ctx.run_id, ctx.workflow_id, ctx.task_id, ctx.try_number) == (
            run_id,
            "ctxwf",
            "producer",
            1,
        )
        assert ctx.attempt_id == work.id
        assert ctx.params == {"day": "2024-01-01"}
        assert ctx.trigger_event is None

        # variables
        assert ctx.get_variable("cfg_target") == "tbl"
        assert ctx.get_variable("cfg_absent", default="fallback") == "fallback"
        assert ctx.get_variable("cfg_absent", default=None) is None
        with pytest.raises(NotFound) as missing:
            ctx.get_variable("cfg_absent")
        assert missing.value.status == 404
        assert missing.value.code == "not_found"
        ctx.set_variable("cfg_new", "v1")
        ctx.set_variable("cfg_new", "v2")
        assert ctx.get_variable("cfg_new") == "v2"
        ctx.set_variable("cfg_weird key é", "quoted")
        assert ctx.get_variable("cfg_weird key é") == "quoted"
        ctx.delete_variable("cfg_new")
        with pytest.raises(NotFound):
            ctx.get_variable("cfg_new")
        with pytest.raises(NotFound):
            ctx.delete_variable("cfg_new")

        # connections
        conn = ctx.get_connection("warehouse")
        assert (conn.conn_type, conn.host, conn.port, conn.login, conn.schema) == (
            "postgres",
            "db.example",
            5432,
            "etl",
            "public",
        )
        assert conn.password == "hunter2"
        assert conn.extra_dejson == {"sslmode": "require"}
        for shown in (repr(conn), str(conn), f"{conn}", repr([conn])):
            assert "hunter2" not in shown
            assert "sslmode" not in shown
            assert "password='***'" in shown
            assert "extra='***'" in shown
            assert "db.example" in shown

        # XComs
        ctx.xcom_push("numbers", {"a": [1, 2, 3]})
        assert ctx.xcom_pull("producer", "numbers") == {"a": [1, 2, 3]}
        assert ctx.xcom_pull("consumer", default="none yet") == "none yet"
        with pytest.raises(NotFound):
            ctx.xcom_pull("consumer")
        with pytest.raises(TypeError, match="JSON-serializable"):
            ctx.xcom_push("bad", {1, 2})

        # what policy does not grant is refused, default or not
        with pytest.raises(NotPermitted) as denied:
            ctx.get_variable("secret_key", default="quietly")
        assert denied.value.status == 403
        assert denied.value.code == "not_granted"
        assert "secret_key" in str(denied.value)
        with pytest.raises(NotPermitted):
            ctx.set_variable("secret_key", "overwritten")
        with pytest.raises(NotPermitted):
            ctx.get_connection("elsewhere")

        # the return value becomes the XCom the next task reads
        assert client.succeed({"n": 1}) == "success"
        # ... and ends this token's life
        with pytest.raises(Unauthorized) as revoked:
            client.task_context()
        assert revoked.value.code == "revoked"

    if api is None:
        assert stand_in.token_requests == []  # the child never held a token
        assert ("GET", "/v1/task/variables/cfg_weird%20key%20%C3%A9") in stand_in.proxied
    else:
        assert stand_in.proxied == []
        assert len(stand_in.token_requests) == 1  # fetched once, cached

    consumer = live_server.claim("task")
    credential_socket(consumer, api=api)
    with connect() as client:
        ctx = Context(client=client, info=client.task_context())
        assert ctx.task_id == "consumer"
        assert ctx.xcom_pull("producer") == {"n": 1}
        assert ctx.xcom_pull("producer", "numbers") == {"a": [1, 2, 3]}
        assert client.retry("gave up") == "failed"
    states = {a["task_id"]: a["state"] for a in live_server.attempts(run_id)}
    assert states == {"producer": "success", "consumer": "failed"}


@pytest.mark.slow
@pytest.mark.server_settings(work_token_ttl=4)
def test_the_token_is_fetched_again_before_it_expires(
    live_server: LiveServer, credential_socket: Serve
) -> None:
    _, work = start_attempt(live_server)
    stand_in = credential_socket(work, api="tcp")
    first_expiry = work.expires_at
    with connect() as client:
        client.task_context()
        client.task_context()
        assert len(stand_in.token_requests) == 1  # cached while fresh
        fetched = stand_in.token_requests[0]
        # Past 80% of the remaining lifetime, but before the end (exp is whole seconds).
        time.sleep(max(0.0, fetched + 0.9 * (first_expiry - fetched) - time.time()))
        client.task_context()
        assert len(stand_in.token_requests) == 2
        assert stand_in.token_requests[1] < first_expiry
        assert stand_in.expires_at > first_expiry  # a refreshed token was handed out
        assert client.succeed() == "success"


def test_an_expired_token_is_replaced_and_the_call_sent_again(
    live_server: LiveServer, credential_socket: Serve
) -> None:
    _, work = start_attempt(live_server)
    stand_in = credential_socket(work, api="unix")
    claims = json.loads(base64.urlsafe_b64decode(work.token.split(".")[1] + "=="))
    settings = live_server.state.settings
    expired = issue_token(
        live_server.state.signer,
        issuer=settings.issuer,
        audience=settings.audience,
        subject=work.id,
        scope="task",
        ttl_seconds=10,
        extra={"try": claims["try"], "execution": claims["execution"], "sup": claims["sup"]},
        now=time.time() - 60,  # well past the server's leeway
    )
    stand_in.stale_first.append(_wire.TokenReply(token=expired.reveal(), expires_at=expired.exp))
    with connect() as client:
        assert client.succeed("done") == "success"  # a 401 means the server did nothing
    assert [reply.token for reply in stand_in.handed_out] == [expired.reveal(), work.token]


def test_a_misbehaving_supervisor_is_a_typed_error_not_a_hang(tmp_path: Path) -> None:
    path = str(tmp_path / "bad.sock")
    replies = [
        _wire.encode_frame({"type": "proxy_response", "status": 200, "body": None}),
        struct.pack(">I", _wire.MAX_FRAME + 1),
        struct.pack(">I", 50) + b'{"type":',
        _wire.encode_frame({"type": "token", "token": "t", "expires_at": 1, "extra": 1}),
    ]
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(path)
        listener.listen()

        def answer() -> None:
            for reply in replies:
                conn, _ = listener.accept()
                with conn:
                    _wire.recv_frame(conn)
                    conn.sendall(reply)

        thread = threading.Thread(target=answer, daemon=True)
        thread.start()
        with Client(socket_path=path, api_url="http://127.0.0.1:9", retries=0) as client:
            # Each failure drops the connection; the next call connects afresh.
            with pytest.raises(ProtocolError, match="expected a 'token' reply"):
                client.get_variable("k")
            with pytest.raises(FrameTooLarge):
                client.get_variable("k")
            with pytest.raises(ConnectionLost, match="closed after 8 of 50 bytes"):
                client.get_variable("k")
            with pytest.raises(ProtocolError, match="unknown fields"):
                client.get_variable("k")
        thread.join(5)


def test_the_token_stays_out_of_reprs_errors_and_logs(
    live_server: LiveServer, credential_socket: Serve, caplog: pytest.LogCaptureFixture
) -> None:
    _, work = start_attempt(live_server)
    credential_socket(work, api="tcp")
    caplog.set_level(logging.DEBUG)
    client = connect()
    client.task_context()
    texts = [repr(client), str(client)]
    client.succeed()
    with pytest.raises(Unauthorized) as err:
        client.task_context()
    texts += [str(err.value), repr(err.value), caplog.text]
    client.close()
    texts.append(repr(client))
    for text in texts:
        assert work.token not in text
        assert work.token.split(".")[2] not in text  # not even the signature
    assert "***" in texts[0]


def test_outside_a_sandbox_the_error_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PRIVSEP_CREDENTIAL_SOCKET", raising=False)
    with pytest.raises(NotInSandbox, match="not running in a privsep sandbox"):
        Client()
    with pytest.raises(NotInSandbox, match=r"\$PRIVSEP_CREDENTIAL_SOCKET is not set"):
        connect()


def test_a_closed_client_cannot_be_reused(
    live_server: LiveServer, credential_socket: Serve
) -> None:
    _, work = start_attempt(live_server)
    credential_socket(work)
    client = connect()
    with client:
        assert client.task_context()["task_id"] == "producer"
    assert client.closed
    client.close()  # twice is fine
    with pytest.raises(ClientClosed, match="once it has been closed"):
        client.task_context()
    with pytest.raises(ClientClosed):
        client.__enter__()


def test_an_unreachable_api_is_server_unavailable_after_retries(
    live_server: LiveServer, credential_socket: Serve
) -> None:
    _, work = start_attempt(live_server)
    credential_socket(work)
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{probe.getsockname()[1]}"
    with Client(api_url=dead, retries=2, backoff=0.01, timeout=2) as client:
        with pytest.raises(ServerUnavailable, match="cannot reach the API") as err:
            client.task_context()
        assert err.value.request_sent is False


def test_supervisor_error_replies_are_typed(
    live_server: LiveServer, credential_socket: Serve
) -> None:
    _, work = start_attempt(live_server)
    stand_in = credential_socket(work, api="tcp")
    stand_in.error_reply = _wire.ErrorReply(code="no_token", message="the attempt has ended")
    with connect() as client, pytest.raises(Refused, match="the attempt has ended") as err:
        client.task_context()
    assert err.value.code == "no_token"
    stand_in.error_reply = _wire.ErrorReply(code="server_unavailable", message="API down")
    with Client(retries=1, backoff=0.01) as client, pytest.raises(ServerUnavailable):
        client.get_variable("x")


def test_keys_that_no_route_can_match_are_refused_before_sending(
    live_server: LiveServer, credential_socket: Serve
) -> None:
    _, work = start_attempt(live_server)
    stand_in = credential_socket(work)
    with connect() as client:
        for key in ("", ".", "..", "a/b"):
            with pytest.raises(ValueError, match="cannot be used"):
                client.get_variable(key)
        with pytest.raises(TypeError, match="strings"):
            client.set_variable("k", 3)  # type: ignore[arg-type]
    assert stand_in.proxied == []


# --- status mapping and retries, with a swappable transport ------------------------------


class Script:
    """Answers calls from a list of (status, body) or exceptions, and counts them."""

    def __init__(self, *answers: Any) -> None:
        self.answers = list(answers)
        self.calls: list[tuple[str, str]] = []

    def __call__(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        self.calls.append((method, path))
        answer = self.answers.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        return answer  # type: ignore[no-any-return]


def test_idempotent_calls_are_retried_on_5xx_and_connection_errors() -> None:
    script = Script(
        (503, {"code": "x", "message": "busy"}),
        ServerUnavailable("down", request_sent=True),
        (200, {"key": "k", "value": "v"}),
    )
    with Client(transport=MockTransport(script), backoff=0) as client:
        assert client.get_variable("k") == "v"
    assert len(script.calls) == 3


def test_state_changing_posts_are_not_retried_once_sent() -> None:
    script = Script((502, None))
    client = Client(transport=MockTransport(script), backoff=0)
    with client, pytest.raises(ServerUnavailable, match="HTTP 502") as err:
        client.fail_trigger("t1", "boom")
    assert err.value.status == 502
    assert len(script.calls) == 1

    script = Script(ServerUnavailable("reset mid-request", request_sent=True))
    client = Client(transport=MockTransport(script), backoff=0)
    with client, pytest.raises(ServerUnavailable):
        client.fire_trigger("t1", {})
    assert len(script.calls) == 1


@pytest.mark.parametrize(
    ("report", "path"),
    [
        (lambda c: c.succeed(1), "/v1/task/succeed"),
        (lambda c: c.fail("boom"), "/v1/task/fail"),
        (lambda c: c.retry("again"), "/v1/task/retry"),
        (lambda c: c.defer({"module": "m", "qualname": "T"}), "/v1/task/defer"),
    ],
)
def test_outcome_reports_are_retried_through_an_outage_sent_or_not(
    report: Callable[[Client], object], path: str
) -> None:
    """The server answers a repeated report with its first answer, so a report whose reply
    was lost (a 502, a 503, a reset after sending) is sent again rather than given up."""
    ok = {"state": "success"}
    script = Script(
        (502, None),
        ServerUnavailable("reset mid-request", request_sent=True),
        (503, {"code": "database_unavailable", "message": "down"}),
        (200, ok),
    )
    with Client(transport=MockTransport(script), backoff=0) as client:
        report(client)
    assert script.calls == [("POST", path)] * 4


def test_an_outcome_report_gives_up_after_its_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    import privsep.client._client as client_module

    monkeypatch.setattr(client_module, "REPORT_RETRY_SECONDS", 0.05)
    script = Script(*[(503, None)] * 1000)
    client = Client(transport=MockTransport(script), backoff=0.01)
    with client, pytest.raises(ServerUnavailable, match="HTTP 503"):
        client.succeed(1)
    assert 1 < len(script.calls) < 1000


def test_a_post_that_never_left_is_retried() -> None:
    script = Script(
        ServerUnavailable("connection refused", request_sent=False),
        (200, {"state": "success"}),
    )
    with Client(transport=MockTransport(script), backoff=0) as client:
        assert client.succeed() == "success"
    assert len(script.calls) == 2


def test_retries_are_bounded() -> None:
    script = Script(*[(500, None)] * 3)
    client = Client(transport=MockTransport(script), retries=2, backoff=0)
    with client, pytest.raises(ServerUnavailable):
        client.xcom_pull("t")
    assert len(script.calls) == 3


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (400, BadRequest),
        (401, Unauthorized),
        (403, NotPermitted),
        (404, NotFound),
        (409, Conflict),
        (413, BadRequest),
        (422, BadRequest),
        (418, ProtocolError),
    ],
)
def test_statuses_map_to_typed_errors(status: int, error: type[Exception]) -> None:
    script = Script((status, {"code": "some_code", "message": "what happened"}))
    with Client(transport=MockTransport(script)) as client, pytest.raises(error) as err:
        client.get_variable("k")
    if status != 418:
        assert err.value.code == "some_code"  # type: ignore[attr-defined]
        assert "GET /v1/task/variables/k: what happened" in str(err.value)
