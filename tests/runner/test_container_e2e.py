"""The supervisor end to end with ``sandbox.backend = "container"``: a real ``runner server``,
a real ``runner supervisor``, and every parse and task in a real Docker container.

Sandbox uids: 207100-207149 (the container tests' range).
"""

from __future__ import annotations

import shutil
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from stack import Stack

from docker_kit import containers_labelled, require_docker

WHERE = textwrap.dedent("""
    import os
    from privsep.client import Context, Workflow

    wf = Workflow("where", schedule=None)

    def _root_fs() -> str:
        with open("/proc/self/mountinfo") as fh:
            return fh.readline().split(" - ")[1].split()[0]

    @wf.task
    def probe(ctx: Context) -> dict:
        print("in a container: root fs", _root_fs(), "uid", os.getuid(), "pid", os.getpid())
        ctx.log.info("token fetched over the credential socket")
        return {"uid": os.getuid()}

    @wf.task(upstream=[probe])
    def use(ctx: Context) -> int:
        return ctx.xcom_pull("probe")["uid"]
""")


@pytest.fixture
def stack() -> Iterator[Stack]:
    require_docker()
    home = Path(tempfile.mkdtemp(prefix="pc-", dir="/tmp"))
    home.chmod(0o700)
    s = Stack(
        home,
        uid_first=207_100,
        PRIVSEP__SANDBOX__BACKEND="container",
        PRIVSEP__SUPERVISOR__DRAIN_GRACE="3",
    )
    s.setup()
    (home / "workflows" / "where.py").write_text(WHERE)
    s.start_server()
    try:
        yield s
    finally:
        s.stop_all()
        shutil.rmtree(home, ignore_errors=True)


def test_a_definition_is_parsed_and_its_tasks_run_in_containers(stack: Stack) -> None:
    stack.start("supervisor", "supervisor")
    stack.wait_for(lambda: "container backend" in stack.output("supervisor"), 60, "start")
    run_id = stack.trigger_when_parsed("where", timeout=90)
    stack.wait_for(lambda: stack.run_state(run_id) in ("success", "failed"), 120, "the run")
    attempts = stack.attempts(run_id)
    assert stack.run_state(run_id) == "success", (attempts, stack.output("supervisor")[-3000:])
    probe = next(a for a in attempts if a["task_id"] == "probe")
    logs = stack.runner("logs", probe["id"])
    assert logs.returncode == 0, logs.stderr
    # Docker's overlay root, a pool uid, and the entry process as the container's PID 1.
    assert "in a container: root fs overlay uid 2071" in logs.stdout, logs.stdout
    assert " pid 1\n" in logs.stdout
    assert stack.stop("supervisor") == 0
    assert containers_labelled("sup-test") == []


def test_a_missing_image_is_one_line_naming_the_build_command(stack: Stack) -> None:
    stack.env["PRIVSEP__SANDBOX__IMAGE"] = "privsep-sandbox:not-built"
    proc = stack.start("supervisor", "supervisor")
    assert proc.wait(timeout=60) == 1
    out = stack.output("supervisor")
    assert "Traceback" not in out, out
    assert (
        "runner: the sandbox image privsep-sandbox:not-built is missing; build it with "
        "packaging/container/build-image --tag privsep-sandbox:not-built\n"
    ) in out, out
