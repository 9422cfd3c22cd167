"""Failing over between server URLs, against real HTTP servers on real sockets.

Each fault is real: a refused connection is a port nobody listens on, a lost answer is a
server that reads the request and hangs up, a 502/503 is a server that answers it. What is
checked is the rule of :mod:`privsep.runner.api.failover`: a request the server cannot have
acted on goes to the next URL, a POST it may have acted on is never sent twice, and the next
request starts at the URL that answered.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from stack import free_port

from privsep.runner.api.failover import FailoverClient
from privsep.runner.api.keepalive import HttpUnavailable


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Replica

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        self.server.seen.append(f"{self.command} {self.path}")
        if self.server.mode == "drop":  # read the request, then hang up without answering
            self.close_connection = True
            self.connection.shutdown(2)
            return
        status = self.server.status
        out = json.dumps({"replica": self.server.label}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    do_GET = do_POST = _answer


class _Replica(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, label: str) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.label = label
        self.seen: list[str] = []
        self.status = 200
        self.mode = "answer"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


@pytest.fixture
def replicas() -> Iterator[tuple[_Replica, _Replica]]:
    pair = (_Replica("a"), _Replica("b"))
    threads = [threading.Thread(target=r.serve_forever, daemon=True) for r in pair]
    for t in threads:
        t.start()
    try:
        yield pair
    finally:
        for r in pair:
            r.shutdown()
            r.server_close()
        for t in threads:
            t.join()


def _dead_url() -> str:
    return f"http://127.0.0.1:{free_port()}"


def test_a_refused_connection_moves_every_method_to_the_next_url_and_stays_there(
    replicas: tuple[_Replica, _Replica],
) -> None:
    a, b = replicas
    client = FailoverClient([_dead_url(), a.url, b.url], timeout=5)
    try:
        first = client.request("POST", "/v1/supervisor/outcome", {"x": 1})
        second = client.request("POST", "/v1/supervisor/heartbeat")
        assert client.base_url == a.url
    finally:
        client.close()
    assert first.data == second.data == {"replica": "a"}
    assert a.seen == ["POST /v1/supervisor/outcome", "POST /v1/supervisor/heartbeat"]
    assert b.seen == []


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_a_503_went_nowhere_so_any_method_goes_to_the_next_replica(
    replicas: tuple[_Replica, _Replica], method: str
) -> None:
    a, b = replicas
    a.status = 503
    client = FailoverClient([a.url, b.url], timeout=5)
    try:
        reply = client.request(method, "/v1/x")
    finally:
        client.close()
    assert (reply.status, reply.data) == (200, {"replica": "b"})
    assert a.seen == b.seen == [f"{method} /v1/x"]


def test_a_post_the_server_may_have_acted_on_is_not_sent_twice(
    replicas: tuple[_Replica, _Replica],
) -> None:
    a, b = replicas
    a.mode = "drop"
    client = FailoverClient([a.url, b.url], timeout=5)
    try:
        with pytest.raises(HttpUnavailable) as lost:
            client.request("POST", "/v1/task/succeed", {"result": 1})
        assert lost.value.sent
        # ... but the next request goes to the next replica.
        after = client.request("POST", "/v1/task/succeed", {"result": 1})
    finally:
        client.close()
    assert a.seen == ["POST /v1/task/succeed"]
    assert b.seen == ["POST /v1/task/succeed"]
    assert after.data == {"replica": "b"}


def test_a_gateway_502_is_returned_for_a_post_and_retried_for_a_get(
    replicas: tuple[_Replica, _Replica],
) -> None:
    a, b = replicas
    a.status = 502
    post_client = FailoverClient([a.url, b.url], timeout=5)
    get_client = FailoverClient([a.url, b.url], timeout=5)
    try:
        posted = post_client.request("POST", "/v1/p")
        got = get_client.request("GET", "/v1/g")
        assert post_client.base_url == b.url  # it moves on for the next request
    finally:
        post_client.close()
        get_client.close()
    assert posted.status == 502
    assert got.data == {"replica": "b"}
    assert a.seen == ["POST /v1/p", "GET /v1/g"]
    assert b.seen == ["GET /v1/g"]


def test_a_lost_get_answer_is_asked_again_of_the_next_replica(
    replicas: tuple[_Replica, _Replica],
) -> None:
    a, b = replicas
    a.mode = "drop"
    client = FailoverClient([a.url, b.url], timeout=5)
    try:
        reply = client.request("GET", "/v1/variables/x")
    finally:
        client.close()
    assert reply.data == {"replica": "b"}


def test_when_every_url_fails_the_most_telling_answer_comes_back(
    replicas: tuple[_Replica, _Replica],
) -> None:
    a, _ = replicas
    a.status = 503
    client = FailoverClient([a.url, _dead_url()], timeout=5)
    nobody = FailoverClient([_dead_url(), _dead_url()], timeout=5)
    try:
        assert client.request("POST", "/v1/x").status == 503
        with pytest.raises(HttpUnavailable) as refused:
            nobody.request("GET", "/v1/x")
    finally:
        client.close()
        nobody.close()
    assert refused.value.reason == "Connection refused"
    assert not refused.value.sent


def test_one_url_behaves_as_before(replicas: tuple[_Replica, _Replica]) -> None:
    a, _ = replicas
    a.status = 503
    client = FailoverClient(a.url, timeout=5)
    try:
        assert client.request("GET", "/v1/x").status == 503
    finally:
        client.close()
    assert a.seen == ["GET /v1/x"]  # asked once: one URL has nowhere else to go
