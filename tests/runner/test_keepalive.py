"""The supervisor's keep-alive HTTP client against a real HTTP/1.1 server on a real socket."""

from __future__ import annotations

import json
import socketserver
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from privsep.runner.api.keepalive import HttpUnavailable, KeepAliveClient


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        self.server.seen.append(
            {
                "method": self.command,
                "path": self.path,
                "port": self.client_address[1],
                "auth": self.headers.get("Authorization"),
                "body": json.loads(raw) if raw else None,
            }
        )
        if self.path.endswith("/drop"):  # read the request, then hang up without answering
            self.close_connection = True
            self.connection.shutdown(2)
            return
        if self.path.endswith("/text"):
            out, ctype = b"not json", "text/plain"
        else:
            out, ctype = json.dumps({"echo": self.path}).encode(), "application/json"
        self.send_response(418 if self.path.endswith("/teapot") else 200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(out)))
        if self.path.endswith("/close"):
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(out)

    do_GET = do_POST = _answer


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.seen: list[dict[str, Any]] = []


@pytest.fixture
def server() -> Iterator[_Server]:
    srv = _Server()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join()


def _client(srv: _Server, prefix: str = "") -> KeepAliveClient:
    host, port = srv.server_address[:2]
    return KeepAliveClient(f"http://{host!s}:{port}{prefix}/", timeout=5)


def test_json_in_and_out_over_one_kept_connection(server: _Server) -> None:
    client = _client(server, "/api")
    try:
        first = client.request("POST", "/v1/x", {"a": 1}, token="tok")
        second = client.request("GET", "/v1/y")
    finally:
        client.close()
    assert (first.status, first.data) == (200, {"echo": "/api/v1/x"})
    assert second.data == {"echo": "/api/v1/y"}
    a, b = server.seen
    assert (a["method"], a["auth"], a["body"]) == ("POST", "Bearer tok", {"a": 1})
    assert (b["method"], b["auth"], b["body"]) == ("GET", None, None)
    assert a["port"] == b["port"], "the second call should reuse the first call's connection"


def test_each_thread_has_its_own_connection(server: _Server) -> None:
    client = _client(server)
    try:
        client.request("GET", "/main")
        other = threading.Thread(target=lambda: client.request("GET", "/other"))
        other.start()
        other.join()
    finally:
        client.close()
    assert server.seen[0]["port"] != server.seen[1]["port"]


def test_a_connection_the_server_closed_is_replaced_before_reuse(server: _Server) -> None:
    client = _client(server)
    try:
        client.request("GET", "/close")  # the server answers, then closes the connection
        again = client.request("POST", "/after", {"n": 2})
    finally:
        client.close()
    assert again.data == {"echo": "/after"}
    assert [s["path"] for s in server.seen] == ["/close", "/after"]  # each sent once


def test_a_post_that_gets_no_answer_is_reported_and_not_sent_again(server: _Server) -> None:
    client = _client(server)
    try:
        with pytest.raises(HttpUnavailable) as caught:
            client.request("POST", "/drop", {"once": True})
        assert isinstance(caught.value, OSError)  # the proxy contract's "unreachable"
        assert client.request("GET", "/next").data == {"echo": "/next"}  # a new connection
    finally:
        client.close()
    assert [s["path"] for s in server.seen] == ["/drop", "/next"]


def test_status_and_a_body_that_is_not_json(server: _Server) -> None:
    client = _client(server)
    try:
        teapot = client.request("GET", "/teapot")
        text = client.request("GET", "/text")
    finally:
        client.close()
    assert teapot.status == 418
    assert (text.status, text.data, text.text) == (200, None, "not json")


def test_an_unreachable_server_and_a_closed_client_raise_unavailable(server: _Server) -> None:
    client = _client(server)
    port = server.server_address[1]
    server.shutdown()
    server.server_close()
    nobody = KeepAliveClient(f"http://127.0.0.1:{port}", timeout=2)
    with pytest.raises(HttpUnavailable, match=r"talking to http://127\.0\.0\.1"):
        nobody.request("GET", "/v1/health")
    client.close()
    with pytest.raises(HttpUnavailable, match="closed"):
        client.request("GET", "/v1/health")


@pytest.mark.parametrize("url", ["ftp://host/", "http:///path", "127.0.0.1:8780"])
def test_a_url_that_is_not_http_is_refused_at_once(url: str) -> None:
    with pytest.raises(ValueError, match="must be http"):
        KeepAliveClient(url)


class _UnixServer(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True

    def __init__(self, path: str) -> None:
        super().__init__(path, _UnixHandler)
        self.seen: list[dict[str, Any]] = []


class _UnixHandler(_Handler):
    def address_string(self) -> str:
        return "unix"

    def setup(self) -> None:
        super().setup()
        self.client_address = ("unix", id(self.connection))  # one per connection


def test_over_a_unix_socket_with_the_urls_host_in_the_header(tmp_path: Path) -> None:
    path = str(tmp_path / "api.sock")
    srv = _UnixServer(path)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    # The URL's port is closed: only the socket can answer.
    client = KeepAliveClient("http://api.internal:1/p/", timeout=5, unix_socket=path)
    try:
        first = client.request("POST", "/v1/x", {"a": 1}, token="tok")
        second = client.request("GET", "/v1/y")
    finally:
        client.close()
        srv.shutdown()
        srv.server_close()
        thread.join()
    assert (first.status, first.data) == (200, {"echo": "/p/v1/x"})
    assert second.data == {"echo": "/p/v1/y"}
    a, b = srv.seen
    assert a["body"] == {"a": 1} and a["auth"] == "Bearer tok"
    assert a["port"] == b["port"], "the second call should reuse the first call's connection"


def test_a_unix_socket_with_https_is_refused() -> None:
    with pytest.raises(ValueError, match="plain HTTP"):
        KeepAliveClient("https://api.internal/", unix_socket="/run/x.sock")
