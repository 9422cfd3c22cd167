"""The supervisor's metrics listener stays on this host: only a loopback address is taken,
by the configuration and again by the listener itself, and a port already taken is one line
that stops the supervisor, not a traceback."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from helpers import clean_env, run_runner
from privsep.runner.errors import CommandError
from privsep.runner.supervisor import metrics


@pytest.mark.parametrize("bind", ["0.0.0.0:9781", "10.1.2.3:9781", ":9781", "[::]:9781"])
def test_a_non_loopback_address_is_refused_by_the_configuration(tmp_path: Path, bind: str) -> None:
    env = clean_env(tmp_path, {"PRIVSEP__SUPERVISOR__METRICS_BIND": bind})
    done = run_runner("config", "get", "supervisor.metrics_bind", env=env)
    assert done.returncode == 2
    assert "loopback host:port" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("bind", ["0.0.0.0:9781", "192.168.1.1:80", "127.0.0.1:0", "x:1"])
def test_the_listener_itself_takes_only_loopback(bind: str) -> None:
    with pytest.raises(CommandError, match="not a loopback host:port"):
        metrics.serve(bind)


def test_the_listener_serves_and_a_taken_port_is_one_line() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(CommandError) as refused:
            metrics.serve(f"127.0.0.1:{port}")
        assert str(refused.value).startswith(f"cannot listen for metrics on 127.0.0.1:{port}")
        assert "\n" not in str(refused.value)
    listener = metrics.serve(f"127.0.0.1:{port}")
    try:
        metrics.claimed([{"kind": "task"}, {"kind": "parse"}])
        text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    finally:
        metrics.stop(listener)
    names = {f.name for f in text_string_to_metric_families(text)}
    assert {
        "privsep_supervisor_claims",
        "privsep_supervisor_claimed_items",
        "privsep_supervisor_launches",
        "privsep_supervisor_launch_duration_seconds",
        "privsep_supervisor_running_sandboxes",
    } <= names
    assert metrics.serve("") is None
