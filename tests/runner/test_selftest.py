"""``runner selftest``: the scorecard holds on a real installation, and each line can fail.

The command runs as an operator would run it, on a home with real credentials and key ring,
against both backends. Then the battery runs through a backend with one protection taken away
at a time (the network, the uid's file permissions, the environment allowlist): the line for
that protection must say LEAKED, or the scorecard could not tell a broken host from a good one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from stack import Stack, short_home

from docker_kit import require_docker
from privsep.runner.config.loader import load_config
from privsep.runner.selftest.battery import ATTACKS, planted, run_battery
from privsep.runner.supervisor.settings import SupervisorSettings
from privsep.sandbox import ProcessBackend, SandboxSpec, UidPool

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="sandboxes need root")


@pytest.fixture(scope="module")
def installed() -> Iterator[Stack]:
    """A home as `runner` leaves it: key ring, database, supervisor and operator keys."""
    stack = Stack(short_home("pst-self-"), uid_first=233_000)
    stack.setup()
    yield stack
    stack.stop_all()


def _scorecard(stack: Stack, *args: str) -> tuple[int, dict[str, Any]]:
    done = stack.runner("selftest", "--json", *args, timeout=300)
    assert done.stderr == "" or "Traceback" not in done.stderr, done.stderr
    return done.returncode, json.loads(done.stdout)


@pytest.mark.parametrize("backend", ["process", "container"])
def test_selftest_holds_on_a_real_installation(installed: Stack, backend: str) -> None:
    if backend == "container":
        require_docker()
    rc, card = _scorecard(installed, "--backend", backend)
    lines = {a["attack"]: a for a in card["attacks"]}
    assert sorted(lines) == sorted(a.name for a in ATTACKS)
    assert all(a["result"] == "held" for a in card["attacks"]), card
    assert rc == 0 and card["ok"] is True and card["backend"] == backend
    # The configured secrets were really aimed at, not skipped.
    aimed = lines["read_secrets"]["detail"]
    assert "credentials" in aimed or "supervisor.key" in aimed, aimed


def test_selftest_text_scorecard_and_exit_status(installed: Stack) -> None:
    done = installed.runner("selftest", timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith(("held", "LEAKED"))]
    assert len(rows) == len(ATTACKS)
    assert done.stdout.rstrip().endswith(f"{len(ATTACKS)} held, 0 leaked, 0 could not run")


def test_selftest_refuses_a_bad_backend_name_in_one_line(installed: Stack) -> None:
    done = installed.runner("selftest", "--backend", "vm")
    assert done.returncode == 2
    assert "invalid choice" in done.stderr and "Traceback" not in done.stderr


class Weakened:
    """A real process backend that launches every spec with protections removed."""

    def __init__(self, backend: ProcessBackend, weaken: Callable[[SandboxSpec], SandboxSpec]):
        self.backend = backend
        self.weaken = weaken

    def launch(self, spec: SandboxSpec) -> Any:
        return self.backend.launch(self.weaken(spec))


def test_each_line_says_leaked_when_its_protection_is_removed(installed: Stack) -> None:
    os.environ["PRIVSEP_HOME"] = str(installed.home)
    try:
        cfg = load_config(None)
    finally:
        del os.environ["PRIVSEP_HOME"]
    settings = SupervisorSettings.from_config(cfg)
    with (
        planted(cfg, settings) as plant,
        ProcessBackend(launch_mode="spawn", uid_pool=UidPool(234_000, 8)) as backend,
    ):
        plant.secret_file.chmod(0o644)  # the uid drop no longer keeps it out

        def weaken(spec: SandboxSpec) -> SandboxSpec:
            # The host's network, and the supervisor's secret in the allowlisted environment.
            env = {**spec.env, "PRIVSEP_SELFTEST_SECRET": plant.marker}
            return dataclasses.replace(spec, network="host", env=env)

        verdicts = {v.attack: v for v in run_battery(Weakened(backend, weaken), settings, plant)}
    assert verdicts["network"].result == "LEAKED", verdicts["network"]
    assert "host_tcp" in verdicts["network"].detail
    assert verdicts["environment"].result == "LEAKED", verdicts["environment"]
    assert verdicts["read_secrets"].result == "LEAKED", verdicts["read_secrets"]
    assert verdicts["read_secrets"].detail.endswith("supervisor.key")
    # What was not weakened still holds.
    assert verdicts["identity"].result == "held" and verdicts["ptrace"].result == "held"


def test_the_probe_runs_on_the_interpreter_alone() -> None:
    """The probe is stdlib-only: the container image's python3 has nothing else."""
    from privsep.runner.selftest import probe

    imported = {
        line.split()[1].split(".")[0]
        for line in Path(probe.__file__).read_text().splitlines()
        if line.startswith(("import ", "from "))
    }
    assert imported <= set(sys.stdlib_module_names) | {"__future__"}, imported
