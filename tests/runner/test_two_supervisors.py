"""Two nodes, one server: supervisors pull work, and each task runs exactly once.

Work is distributed by pulling: every supervisor claims from the server with its own
credential, and a claim is one conditional UPDATE, so two nodes never take the same attempt.
Here two real supervisors, each with its own home, credential, state and uid range (as on two
hosts), share one real server. The second one runs no discovery: the workflow folder is
shared, as a checkout on both nodes would be.
"""

from __future__ import annotations

import collections
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import pytest
from stack import Stack, running_stack

TASKS = 16
SPREAD = textwrap.dedent(f"""
    import time
    from privsep.client import Context, Workflow

    wf = Workflow("spread", schedule=None)

    def nap(ctx: Context) -> None:
        time.sleep(0.3)

    for _i in range({TASKS}):
        wf.task(task_id=f"t{{_i:02d}}")(nap)
""")


@pytest.fixture
def stack() -> Iterator[Stack]:
    with running_stack("p2-", uid_first=208_000) as s:
        yield s


def second_node(stack: Stack) -> subprocess.Popen[str]:
    """A supervisor with a home of its own, registered on the server as ``sup-b``."""
    home_b = stack.home / "node-b"
    home_b.mkdir(mode=0o700)
    key = home_b / "credentials" / "supervisor.key"
    made = stack.runner("credentials", "create", "--out", str(key))
    assert made.returncode == 0, made.stderr
    registered = stack.runner("supervisors", "register", "sup-b", "--public-key", f"{key}.pub")
    assert registered.returncode == 0, registered.stderr
    env = dict(stack.env)
    env.update(
        {
            "PRIVSEP_HOME": str(home_b),
            "PRIVSEP__CORE__WORKFLOWS_DIR": str(stack.home / "workflows"),
            "PRIVSEP__SUPERVISOR__NAME": "sup-b",
            "PRIVSEP__SUPERVISOR__DISCOVERY": "false",
            "PRIVSEP__SANDBOX__UID_FIRST": "208100",
        }
    )
    out = open(stack.home / "supervisor-b.out", "w")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen(
        [sys.executable, "-m", "privsep", "supervisor"],
        env=env,
        stdout=out,
        stderr=subprocess.STDOUT,
        text=True,
    )
    stack.procs["supervisor-b"] = proc
    return proc


def test_two_supervisors_share_the_work_and_run_each_task_once(stack: Stack) -> None:
    (stack.home / "workflows" / "spread.py").write_text(SPREAD)
    stack.start("supervisor", "supervisor")
    second_node(stack)
    run_id = stack.trigger_when_parsed("spread")
    stack.wait_for(lambda: stack.run_state(run_id) == "success", 120, "the run to succeed")

    attempts = stack.attempts(run_id)
    per_task = collections.Counter(a["task_id"] for a in attempts)
    assert sorted(per_task) == [f"t{i:02d}" for i in range(TASKS)]
    assert set(per_task.values()) == {1}, per_task  # no task claimed twice
    assert {(a["try_number"], a["state"]) for a in attempts} == {(1, "success")}
    by_node = collections.Counter(a["supervisor_id"] for a in attempts)
    assert len(by_node) == 2, by_node  # both nodes took part
    assert "sup-b" in stack.output("supervisor-b")
