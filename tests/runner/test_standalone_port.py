"""``runner standalone`` on a port someone else already serves: one line naming the port and the
settings that move it, a non-zero exit, and nothing of the other server's mistaken for ours.

Real processes throughout: a first standalone (its server and supervisor) and a second one on
its port, and a plain ``python -m http.server``.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import requests
from stack import free_port
from test_standalone import DIAMOND, _operator_when_ready, place, standalone

__all__ = ["place"]  # the fixture, imported for the tests below


def _assert_one_line_about_the_port(done: subprocess.CompletedProcess[str], port: int) -> str:
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"runner: port {port} ("), last
    assert "server.bind" in last and "server.url" in last, last
    assert "unknown_key" not in done.stderr
    return last


def test_a_second_standalone_on_the_port_of_a_first_says_so(
    place: tuple[Path, Path, dict[str, str]], tmp_path: Path
) -> None:
    home, workflows, env = place
    (workflows / "diamond.py").write_text(DIAMOND)
    url = env["PRIVSEP__SERVER__URL"]
    port = int(url.rsplit(":", 1)[1])
    first = subprocess.Popen(
        [
            *(sys.executable, "-m", "privsep", "standalone"),
            *("--home", str(home), "--workflows", str(workflows)),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _operator_when_ready(home, url, first)
        other_home = home.parent / "home2"
        done = standalone(other_home, "--workflows", str(workflows), "--once", env=env)
        last = _assert_one_line_about_the_port(done, port)
        assert "another privsep deployment (instance " in last
        # The same home again: recognised as its own deployment, still refused.
        again = standalone(home, "--workflows", str(workflows), "--once", env=env)
        assert "a privsep server of this same home" in _assert_one_line_about_the_port(again, port)
        # The first one was not disturbed.
        assert requests.get(url + "/v1/health", timeout=5).status_code == 200
        assert first.poll() is None
    finally:
        first.send_signal(signal.SIGINT)
        first.communicate(timeout=90)


def test_standalone_on_a_port_served_by_something_else_says_so(
    place: tuple[Path, Path, dict[str, str]],
) -> None:
    home, workflows, env = place
    (workflows / "diamond.py").write_text(DIAMOND)
    port = free_port()
    env = {
        **env,
        "PRIVSEP__SERVER__BIND": f"127.0.0.1:{port}",
        "PRIVSEP__SERVER__URL": f"http://127.0.0.1:{port}",
    }
    plain = subprocess.Popen(
        [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port)],
        cwd=workflows,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                requests.get(f"http://127.0.0.1:{port}/", timeout=1)
                break
            except requests.RequestException:
                time.sleep(0.1)
        done = standalone(home, "--workflows", str(workflows), "--once", env=env)
        last = _assert_one_line_about_the_port(done, port)
        assert "something that is not a privsep server" in last
    finally:
        plain.terminate()
        plain.wait(timeout=10)
