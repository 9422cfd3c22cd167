"""Who may look at ``runner ui``'s page, attacked over real HTTP: a real server, the real
``runner ui`` process with the operator credential, and clients with and without its token.

* Nobody without the one-time token or the cookie it buys sees anything (403).
* The token works once: a second client presenting it is refused, and it leaves the URL.
* The page is read-only (405 for anything but GET) and answers only to its own Host
  (a DNS-rebinding page sends its own name).
* Every answer carries the headers that keep it out of frames, referrers and caches, and a
  Content-Security-Policy that allows this page's own script and style only.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest
import requests
from stack import Stack, running_stack
from ui_kit import start_ui

UI_NUMBERS = itertools.count()


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with running_stack("ua-", uid_first=237_000) as s:
        yield s


@pytest.fixture
def url(stack: Stack) -> Iterator[str]:
    """A fresh ``runner ui`` (so a fresh token) for each test."""
    name = f"ui-{next(UI_NUMBERS)}"
    yield start_ui(stack, name)
    stack.stop(name)
    del stack.procs[name]  # a stopped page is no failure of the next test's wait


def origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def assert_guarded(resp: requests.Response) -> None:
    csp = resp.headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp
    assert "unsafe-inline" not in csp and "frame-ancestors 'none'" in csp
    assert resp.headers["X-Frame-Options"] == "DENY"
    assert resp.headers["Referrer-Policy"] == "no-referrer"
    assert resp.headers["Cache-Control"] == "no-store"


def test_the_url_is_on_loopback_and_carries_a_long_token(url: str) -> None:
    parts = urlsplit(url)
    assert parts.hostname == "127.0.0.1" and parts.path == "/"
    token = parts.query.removeprefix("token=")
    assert parts.query.startswith("token=") and len(token) >= 40


def test_without_the_token_or_cookie_every_page_is_403(url: str) -> None:
    base = origin(url)
    for path in ("/", "/runs", "/workflows", "/supervisors", "/refusals", "/static/tail.js"):
        resp = requests.get(base + path, timeout=10, allow_redirects=False)
        assert resp.status_code == 403, path
        assert_guarded(resp)
    wrong = requests.get(base + "/?token=" + "A" * 43, timeout=10, allow_redirects=False)
    assert wrong.status_code == 403
    forged = requests.get(base + "/", cookies={"privsep_ui": "guess"}, timeout=10)
    assert forged.status_code == 403
    # The wrong guesses did not spend the token: its holder still gets in.
    assert requests.get(url, timeout=10).status_code == 200


def test_the_token_buys_one_cookie_for_one_client_and_leaves_the_url(url: str) -> None:
    first = requests.Session()
    resp = first.get(url, timeout=10, allow_redirects=False)
    assert resp.status_code == 303 and resp.headers["Location"] == "/"
    cookie = resp.headers["Set-Cookie"]
    assert cookie.startswith("privsep_ui=")
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/" in cookie
    page = first.get(origin(url) + "/", timeout=10)
    assert page.status_code == 200 and "<h1>Runs</h1>" in page.text
    assert_guarded(page)
    assert "token" not in page.url

    second = requests.Session()
    again = second.get(url, timeout=10, allow_redirects=False)
    assert again.status_code == 403
    assert second.get(origin(url) + "/", timeout=10).status_code == 403
    # The first client is unaffected, with or without the (spent) token in its URL.
    assert first.get(url, timeout=10).status_code == 200


def test_only_get_is_answered(url: str) -> None:
    client = requests.Session()
    assert client.get(url, timeout=10).status_code == 200
    for method in ("POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"):
        resp = client.request(method, origin(url) + "/runs", data=b"x", timeout=10)
        assert resp.status_code == 405, method
        assert resp.headers["Allow"] == "GET"


def test_a_foreign_host_header_is_refused(url: str) -> None:
    client = requests.Session()
    assert client.get(url, timeout=10).status_code == 200
    # Sent by hand: requests picks cookies by the Host header, and a rebinding browser would
    # not send this cookie either; the point is that even a client holding it is refused.
    cookie = {"Cookie": f"privsep_ui={client.cookies['privsep_ui']}"}
    port = urlsplit(url).port
    for host in (f"attacker.example:{port}", "127.0.0.1", f"127.0.0.1:{port}.attacker.example"):
        resp = requests.get(origin(url) + "/runs", headers={"Host": host, **cookie}, timeout=10)
        assert resp.status_code == 403, host
        assert "attacker" not in resp.text
    for host in (f"localhost:{port}", f"127.0.0.1:{port}"):
        resp = requests.get(origin(url) + "/runs", headers={"Host": host, **cookie}, timeout=10)
        assert resp.status_code == 200, host


def test_a_token_presented_with_a_foreign_host_is_not_spent(url: str) -> None:
    port = urlsplit(url).port
    resp = requests.get(url, headers={"Host": f"attacker.example:{port}"}, timeout=10)
    assert resp.status_code == 403
    assert requests.get(url, timeout=10).status_code == 200


def test_ui_refuses_to_listen_beyond_loopback(stack: Stack) -> None:
    for bind in ("0.0.0.0", "192.0.2.1", "example.org"):  # noqa: S104 - refused, the point
        done = stack.runner("ui", "--bind", bind)
        assert done.returncode == 2, done
        (line,) = done.stderr.splitlines()
        assert line.startswith(f"runner: --bind {bind}") and "ssh -L" in line
        assert done.stdout == ""


def test_sigterm_stops_the_page_cleanly(stack: Stack) -> None:
    """A service manager's SIGTERM ends the page at once, with exit 0 and no traceback."""
    start_ui(stack, "ui-term")
    assert stack.stop("ui-term", timeout=10) == 0
    assert "Traceback" not in stack.output("ui-term")
    del stack.procs["ui-term"]
