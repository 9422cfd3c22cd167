"""``runner standalone`` end to end, with a temporary home and real sandboxes.

Each test runs the real command; its exit status and its JSON summary are the interface.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from stack import free_port

DIAMOND = textwrap.dedent("""
    from privsep.client import Context, Workflow

    wf = Workflow("diamond", schedule=None)

    @wf.task
    def top(ctx: Context) -> int:
        return 1

    @wf.task(upstream=[top])
    def left(ctx: Context) -> int:
        return ctx.xcom_pull("top") + 1

    @wf.task(upstream=[top])
    def right(ctx: Context) -> int:
        return ctx.xcom_pull("top") + 2

    @wf.task(upstream=[left, right])
    def bottom(ctx: Context) -> int:
        return ctx.xcom_pull("left") + ctx.xcom_pull("right")
""")

RETRY = textwrap.dedent("""
    from privsep.client import Context, Workflow

    wf = Workflow("retry_once", schedule=None)

    @wf.task(retries=1, retry_delay=0)
    def wobbly(ctx: Context) -> str:
        if ctx.try_number == 1:
            raise RuntimeError("first try fails on purpose")
        return "second try worked"
""")

FAILING = textwrap.dedent("""
    from privsep.client import Context, Workflow

    wf = Workflow("failing", schedule=None)

    @wf.task
    def breaks(ctx: Context) -> None:
        raise ValueError("this task always fails")

    @wf.task(upstream=[breaks])
    def never_runs(ctx: Context) -> None:
        raise AssertionError("must be skipped")

    @wf.task(upstream=[never_runs])
    def nor_this(ctx: Context) -> None:
        raise AssertionError("must be skipped")
""")

SLOW = textwrap.dedent("""
    import time
    from privsep.client import Context, Workflow

    wf = Workflow("slow_retry", schedule=None)

    @wf.task(retries=1, retry_delay=0)
    def nap(ctx: Context) -> int:
        if ctx.try_number == 1:
            time.sleep(60)
        return ctx.try_number
""")


@pytest.fixture
def place() -> Iterator[tuple[Path, Path, dict[str, str]]]:
    """A short home (socket paths are limited to 107 bytes), a workflows folder, an env."""
    root = Path(tempfile.mkdtemp(prefix="sa-", dir="/tmp"))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PRIVSEP")}
    env.update(
        {
            "PRIVSEP__SERVER__BIND": f"127.0.0.1:{port}",
            "PRIVSEP__SERVER__URL": f"http://127.0.0.1:{port}",
            "PRIVSEP__SANDBOX__UID_FIRST": "170000",
            "PRIVSEP__SANDBOX__UID_COUNT": "50",
            "PRIVSEP__SUPERVISOR__DISCOVERY_INTERVAL": "0.3",
            "PRIVSEP__SERVER__SUPERVISOR_HEARTBEAT_TIMEOUT": "6",
        }
    )
    workflows = root / "workflows"
    workflows.mkdir()
    try:
        yield root / "home", workflows, env
    finally:
        shutil.rmtree(root, ignore_errors=True)


def standalone(
    home: Path, *args: str, env: dict[str, str], timeout: float = 240
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "privsep", "standalone", "--home", str(home), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_once_reports_every_task_and_fails_if_one_did(
    place: tuple[Path, Path, dict[str, str]],
) -> None:
    home, workflows, env = place
    for name, source in (("diamond", DIAMOND), ("retry_once", RETRY), ("failing", FAILING)):
        (workflows / f"{name}.py").write_text(source)
    done = standalone(
        home, "--workflows", str(workflows), "--once", "--json", "--parallelism", "3", env=env
    )
    assert done.returncode == 1, done.stderr
    summary = json.loads(done.stdout)
    assert summary["ok"] is False
    rows = {(r["workflow"], r["task"]): r for r in summary["tasks"]}
    assert {k: (r["state"], r["tries"]) for k, r in rows.items()} == {
        ("diamond", "top"): ("success", 1),
        ("diamond", "left"): ("success", 1),
        ("diamond", "right"): ("success", 1),
        ("diamond", "bottom"): ("success", 1),
        ("retry_once", "wobbly"): ("success", 2),
        ("failing", "breaks"): ("failed", 1),
        ("failing", "never_runs"): ("upstream_failed", 1),
        ("failing", "nor_this"): ("upstream_failed", 1),
    }
    assert "this task always fails" in rows[("failing", "breaks")]["error"]
    # The first run left a home that passes the permission check.
    perms = subprocess.run(
        [sys.executable, "-m", "privsep", "check-perms"],
        env={**env, "PRIVSEP_HOME": str(home)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert perms.returncode == 0, perms.stdout
    # A second run reuses the home and its keys; only good workflows now: exit 0.
    (workflows / "failing.py").unlink()
    again = standalone(home, "--workflows", str(workflows), "--once", "--json", env=env)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["ok"] is True


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("missing", "does not exist"),
        ("empty", "holds no workflow definition file"),
        ("broken", "holds no workflow that parses"),
    ],
)
def test_bad_workflows_folder_exits_2(
    place: tuple[Path, Path, dict[str, str]], setup: str, message: str
) -> None:
    home, workflows, env = place
    folder = workflows / "nope" if setup == "missing" else workflows
    if setup == "broken":
        (workflows / "broken.py").write_text("this is not python(\n")
    done = standalone(home, "--workflows", str(folder), "--once", env=env)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr
    assert "Traceback" not in done.stderr


def test_a_killed_supervisor_is_restarted_and_its_attempt_rescheduled(
    place: tuple[Path, Path, dict[str, str]],
) -> None:
    home, workflows, env = place
    (workflows / "slow_retry.py").write_text(SLOW)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "privsep",
            "standalone",
            "--home",
            str(home),
            "--workflows",
            str(workflows),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = env["PRIVSEP__SERVER__URL"]
    try:
        op = _operator_when_ready(home, url, proc)
        run_id = _trigger_when_parsed(op, url, "slow_retry")
        sup_pid = _wait_for_running_attempt(op, url, run_id, proc.pid)
        os.kill(sup_pid, signal.SIGKILL)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            attempts = requests.get(
                f"{url}/v1/operator/runs/{run_id}/attempts", headers=op, timeout=5
            ).json()["attempts"]
            if any(a["try_number"] == 2 and a["state"] == "success" for a in attempts):
                break
            time.sleep(0.3)
        else:
            raise AssertionError(f"the attempt was not rescheduled: {attempts}")
        first = next(a for a in attempts if a["try_number"] == 1)
        assert first["state"] == "up_for_retry"
        assert "restarted" in (first["error"] or "")
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=90)
    assert "restarting it" in err


def _operator_when_ready(home: Path, url: str, proc: subprocess.Popen[str]) -> dict[str, str]:
    from privsep.secrets.keys import KeyFormatError, load_private_key
    from privsep.secrets.tokens import create_assertion

    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        key_path = home / "credentials" / "operator.key"
        try:
            if key_path.exists():
                key = load_private_key(str(key_path))
                assertion = create_assertion(key, supervisor_name="operator", audience=url)
                resp = requests.post(
                    f"{url}/v1/operator/session", json={"assertion": assertion}, timeout=2
                )
                if resp.status_code == 200:
                    return {"Authorization": f"Bearer {resp.json()['token']}"}
        except (requests.RequestException, OSError, KeyFormatError):
            pass  # not up yet, or the key is still being written
        time.sleep(0.3)
    raise AssertionError("standalone did not come up")


def _trigger_when_parsed(op: dict[str, str], url: str, workflow_id: str) -> str:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        resp = requests.post(
            f"{url}/v1/operator/workflows/{workflow_id}/runs",
            json={"conf": {}},
            headers=op,
            timeout=5,
        )
        if resp.status_code == 200:
            return str(resp.json()["id"])
        time.sleep(0.3)
    raise AssertionError(f"{workflow_id} was never parsed")


def _wait_for_running_attempt(op: dict[str, str], url: str, run_id: str, parent: int) -> int:
    """Wait until the task runs; return the pid of standalone's supervisor child."""
    import psutil

    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        attempts = requests.get(
            f"{url}/v1/operator/runs/{run_id}/attempts", headers=op, timeout=5
        ).json()["attempts"]
        if any(a["state"] == "running" for a in attempts):
            for child in psutil.Process(parent).children():
                if child.cmdline()[-1:] == ["supervisor"]:
                    return int(child.pid)
        time.sleep(0.3)
    raise AssertionError("the task never started")


def _as_background_job() -> None:
    """What a shell does to a background job (``runner standalone &``, nohup, a CI script):
    SIGINT ignored, which Python then leaves ignored unless the program claims it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.mark.parametrize(
    "sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT], ids=lambda s: s.name
)
def test_sigterm_and_sighup_stop_everything_standalone_started(
    place: tuple[Path, Path, dict[str, str]], sig: signal.Signals
) -> None:
    """Like Ctrl-C: the server, the supervisor and the zygotes end with standalone, even when
    it was started as a background job."""
    import psutil

    home, workflows, env = place
    (workflows / "diamond.py").write_text(DIAMOND)
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "privsep", "standalone"),
            *("--home", str(home), "--workflows", str(workflows)),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_as_background_job,
    )
    try:
        _operator_when_ready(home, env["PRIVSEP__SERVER__URL"], proc)
        deadline = time.monotonic() + 60
        started: list[psutil.Process] = []
        while time.monotonic() < deadline:  # the server and the supervisor, with its zygote
            started = psutil.Process(proc.pid).children(recursive=True)
            if len(started) >= 3:
                break
            time.sleep(0.2)
        assert len(started) >= 3, started
        proc.send_signal(sig)
        rc = proc.wait(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
        _, err = proc.communicate(timeout=30)
    assert rc == 0, err
    assert "Traceback" not in err
    _, alive = psutil.wait_procs(started, timeout=10)
    assert alive == [], f"left running after {sig.name}: {[p.pid for p in alive]}"


@pytest.mark.parametrize("kind", ["a file", "under /proc"])
def test_an_unusable_home_is_one_line_and_exit_2(
    place: tuple[Path, Path, dict[str, str]], kind: str
) -> None:
    home, workflows, env = place
    (workflows / "diamond.py").write_text(DIAMOND)
    if kind == "a file":
        home.write_text("not a directory\n")
    else:
        home = Path("/proc/privsep-home")
    done = standalone(home, "--workflows", str(workflows), "--once", env=env, timeout=60)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith(f"runner: cannot use {home} as the privsep home:"), lines
    assert "--home" in lines[-1]
