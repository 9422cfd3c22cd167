"""Server replicas on one PostgreSQL: a replica dies mid-run and the work carries on, once.

Everything is real: a PostgreSQL cluster, two ``runner server`` replicas sharing it and the
signing keys, a supervisor running real sandboxes, and in one test Debian's haproxy in front of
the replicas with HTTP health checks on ``/v1/health``. Both replicas and every client name the
service by one ``server.audience``, so which replica a request reaches does not matter.

The run's tasks each write a marker line (their attempt's log) and then wait for a gate file.
Once every one of them is running, a replica is killed with SIGKILL and the gate opened: the
tasks' own reports (proxied by the supervisor), the supervisor's outcome and claim calls and
the final task's claim must all reach the surviving replica. The markers prove each task's
code ran exactly once; the attempts prove each task needed one try; the run must close.
Nothing here depends on how fast anything is: every wait is for a state, with a bound.
"""

from __future__ import annotations

import collections
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from stack import Stack, free_port, short_home

from privsep.secrets.keys import load_private_key
from privsep.secrets.tokens import create_assertion

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from server.postgres import PostgresCluster, own_cluster

GATED = 3  # tasks running at once when the replica dies; the supervisor's parallelism
AUDIENCE = "privsep-failover-test"
MARKER = re.compile(r"^RAN (\S+) try=(\d+)$", re.MULTILINE)


def workflow(gate: Path) -> str:
    return textwrap.dedent(f"""
        import os
        import sys
        import time
        from privsep.client import Context, Workflow

        wf = Workflow("failover", schedule=None)

        def gated(ctx: Context) -> str:
            print(f"RAN {{ctx.task_id}} try={{ctx.try_number}}", file=sys.stderr, flush=True)
            while not os.path.exists({str(gate)!r}):
                time.sleep(0.05)
            return ctx.task_id

        waiting = [wf.task(task_id=f"gated{{i}}")(gated) for i in range({GATED})]

        @wf.task(upstream=waiting)
        def after(ctx: Context) -> None:
            print(f"RAN {{ctx.task_id}} try={{ctx.try_number}}", file=sys.stderr, flush=True)
    """)


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresCluster]:
    with own_cluster() as cluster:
        yield cluster


class Replicas:
    """A stack whose server is two replicas on one PostgreSQL database, started by port."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.ports = {"a": free_port(), "b": free_port()}

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.ports[name]}"

    def start(self, name: str) -> None:
        env = dict(self.stack.env)
        env["PRIVSEP__SERVER__BIND"] = f"127.0.0.1:{self.ports[name]}"
        # Each replica its own unix socket: they share the home, as two hosts share a config.
        env["PRIVSEP__SERVER__SOCKET"] = str(self.stack.home / "run" / f"replica-{name}.sock")
        out = open(self.stack.home / f"replica-{name}.out", "w")  # noqa: SIM115
        self.stack.procs[f"replica-{name}"] = subprocess.Popen(
            [sys.executable, "-m", "privsep", "server"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
        )
        url = self.url(name)
        self.stack.wait_for(lambda: _healthy(url), 60, f"replica {name} to answer /v1/health")

    def kill(self, name: str) -> int:
        """SIGKILL, no goodbye; the dead process leaves the stack's watch list."""
        proc = self.stack.procs.pop(f"replica-{name}")
        proc.send_signal(signal.SIGKILL)
        return proc.wait(timeout=30)


def _healthy(url: str) -> bool:
    try:
        return requests.get(url + "/v1/health", timeout=2).status_code == 200
    except requests.RequestException:
        return False


@pytest.fixture
def replicas(postgres: PostgresCluster) -> Iterator[Replicas]:
    database = postgres.create_database()
    home = short_home("pfo-")
    stack = Stack(
        home,
        uid_first=209_000,
        PRIVSEP__DATABASE__URL=postgres.url(database),
        PRIVSEP__SERVER__AUDIENCE=AUDIENCE,
        PRIVSEP__SUPERVISOR__PARALLELISM=str(GATED),
    )
    stack.setup()
    try:
        yield Replicas(stack)
    finally:
        stack.stop_all()
        shutil.rmtree(home, ignore_errors=True)
        postgres.drop_database(database)


def run_with_a_replica_killed(replicas: Replicas, kill: str) -> str:
    """Trigger the workflow, wait until every gated task runs, SIGKILL replica ``kill``,
    open the gate, and wait for the run to succeed; the run's id."""
    stack = replicas.stack
    gate = stack.home / "workflows" / "gate"
    (stack.home / "workflows" / "failover.py").write_text(workflow(gate))
    stack.start("supervisor", "supervisor")
    run_id = stack.trigger_when_parsed("failover")

    def all_gated_running() -> bool:
        states = [a["state"] for a in stack.attempts(run_id) if a["task_id"] != "after"]
        return states == ["running"] * GATED and len(markers(stack)) == GATED

    stack.wait_for(all_gated_running, 120, f"{GATED} gated tasks to be running")
    assert replicas.kill(kill) == -signal.SIGKILL
    gate.write_text("open\n")
    gate.chmod(0o644)
    stack.wait_for(lambda: stack.run_state(run_id) == "success", 120, "the run to succeed")
    return run_id


def markers(stack: Stack) -> list[tuple[str, int]]:
    """Every ``RAN task try=N`` line in the supervisor's attempt logs: one per execution."""
    found = []
    for log in (stack.home / "state" / "logs").glob("task-*.log"):
        found += [(m[1], int(m[2])) for m in MARKER.finditer(log.read_text(errors="replace"))]
    return found


def assert_each_task_ran_once(stack: Stack, run_id: str) -> None:
    expected = sorted([*(f"gated{i}" for i in range(GATED)), "after"])
    ran = collections.Counter(task for task, _ in markers(stack))
    assert sorted(ran) == expected
    assert set(ran.values()) == {1}, ran  # no task's code ran twice
    attempts = stack.attempts(run_id)
    assert sorted(a["task_id"] for a in attempts) == expected  # one attempt each
    assert {(a["try_number"], a["state"]) for a in attempts} == {(1, "success")}
    assert stack.run_state(run_id) == "success"  # the run closed


HAPROXY_CFG = """\
global
    maxconn 256

defaults
    mode http
    timeout connect 2s
    timeout client 120s
    timeout server 120s
    # A connection the dead replica refuses is tried again, on the other one.
    retries 3
    option redispatch 1

frontend api
{binds}
    default_backend replicas

backend replicas
    balance roundrobin
    option httpchk GET /v1/health
    http-check expect status 200
    default-server inter 300ms fall 2 rise 2
    server a 127.0.0.1:{a} check
    server b 127.0.0.1:{b} check
"""


def haproxy_binary() -> str:
    found = shutil.which("haproxy") or (
        "/usr/sbin/haproxy" if os.access("/usr/sbin/haproxy", os.X_OK) else None
    )
    if found is None:
        pytest.fail("haproxy is not installed (scripts/test installs it: apt-get install haproxy)")
    return found


@pytest.mark.slow
def test_a_replica_killed_behind_haproxy_loses_no_task_and_runs_none_twice(
    replicas: Replicas,
) -> None:
    stack = replicas.stack
    binary = haproxy_binary()
    lb_port = free_port()
    cfg = stack.home / "haproxy.cfg"
    binds = f"    bind 127.0.0.1:{lb_port}"
    cfg.write_text(HAPROXY_CFG.format(binds=binds, a=replicas.ports["a"], b=replicas.ports["b"]))
    checked = subprocess.run([binary, "-c", "-f", str(cfg)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    replicas.start("a")
    replicas.start("b")
    # Everyone talks to the balancer: the supervisor, its sandboxes' proxied calls, the operator.
    stack.url = f"http://127.0.0.1:{lb_port}"
    stack.env["PRIVSEP__SERVER__URL"] = stack.url
    out = open(stack.home / "haproxy.out", "w")  # noqa: SIM115 - closed with the process
    stack.procs["haproxy"] = subprocess.Popen(
        [binary, "-db", "-f", str(cfg)], stdout=out, stderr=subprocess.STDOUT, text=True
    )
    stack.wait_for(lambda: _healthy(stack.url), 30, "haproxy to answer /v1/health")

    run_id = run_with_a_replica_killed(replicas, kill="a")

    assert_each_task_ran_once(stack, run_id)
    # The balancer took replica a out of rotation by its health check.
    assert _healthy(stack.url)


@pytest.mark.slow
def test_a_supervisor_given_two_replicas_fails_over_when_the_first_dies(
    replicas: Replicas,
) -> None:
    stack = replicas.stack
    replicas.start("a")
    replicas.start("b")
    # The supervisor knows both replicas and starts with a; the operator uses b throughout.
    stack.env["PRIVSEP__SERVER__URLS"] = f"{replicas.url('a')},{replicas.url('b')}"
    stack.env["PRIVSEP__SERVER__URL"] = replicas.url("a")
    stack.url = replicas.url("b")

    run_id = run_with_a_replica_killed(replicas, kill="a")

    assert_each_task_ran_once(stack, run_id)
    switched = f"server {replicas.url('a')} unavailable"
    assert switched in stack.output("supervisor"), stack.output("supervisor")[-3000:]
    # Every replica checks the service's one name: an assertion for a replica's own address
    # is refused, so a token minted for one deployment cannot be replayed at another's URL.
    key = load_private_key(str(stack.home / "credentials/operator.key"))
    for audience, status in ((replicas.url("b"), 401), (AUDIENCE, 200)):
        assertion = create_assertion(key, supervisor_name="operator", audience=audience)
        answer = requests.post(
            replicas.url("b") + "/v1/operator/session", json={"assertion": assertion}, timeout=10
        )
        assert answer.status_code == status, answer.text
    # The operator CLI takes the same list: the dead first replica is skipped.
    listed = stack.runner("runs", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert run_id in listed.stdout
