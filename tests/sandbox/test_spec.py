"""SandboxSpec refuses what must never reach a child, with a message that says why."""

from __future__ import annotations

import pytest

from privsep.sandbox import Limits, SandboxSpec

OK = {"kind": "task", "entry_point": "privsep.sandbox.entrypoints:run_path", "workdir": "/w/1"}


def test_valid_spec_is_frozen_and_env_is_read_only() -> None:
    spec = SandboxSpec(**OK, env={"PATH": "/usr/bin"})  # type: ignore[arg-type]
    with pytest.raises(AttributeError):
        spec.kind = "parse"  # type: ignore[misc]
    with pytest.raises(TypeError):
        spec.env["X"] = "1"  # type: ignore[index]
    assert spec.limits == Limits()
    assert len(spec.sandbox_id) == 16


@pytest.mark.parametrize(
    "name", ["NOTIFY_SOCKET", "WATCHDOG_USEC", "LISTEN_FDS", "CREDENTIALS_DIRECTORY", "PRIVSEP__X"]
)
def test_supervisor_only_variables_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match=f"environment variable {name} may never be passed"):
        SandboxSpec(**OK, env={name: "1"})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("entry_point", "os:system", "entry_point must be 'privsep.module:function'"),
        ("entry_point", "privsep.x", "entry_point must be"),
        ("workdir", "relative/dir", "workdir must be an absolute path"),
        ("workdir", "/a/../etc", "workdir must be normalized"),
        ("workdir", "/", "workdir may not be '/'"),
        ("kind", "daemon", "kind must be one of parse, trigger, task"),
        ("network", "bridge", "network must be none or host"),
        ("sandbox_id", "../x", "is not a safe identifier"),
    ],
)
def test_bad_fields_are_refused(field: str, value: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SandboxSpec(**{**OK, field: value})  # type: ignore[arg-type]


def test_parse_never_gets_the_network() -> None:
    with pytest.raises(ValueError, match="a parse sandbox never gets the network"):
        SandboxSpec(**{**OK, "kind": "parse"}, network="host")  # type: ignore[arg-type]


def test_limits_are_checked() -> None:
    with pytest.raises(ValueError, match=r"limits\.wall_seconds must be positive"):
        Limits(wall_seconds=0)
    with pytest.raises(ValueError, match=r"limits\.pids must be at least 1"):
        Limits(pids=0)
    assert Limits(cpu_seconds=3).to_wire()["cpu_seconds"] == 3
    assert "cpu_seconds" not in Limits().to_wire()
