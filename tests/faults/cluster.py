"""A small multi-node installation on real processes, and what must hold after a fault.

PostgreSQL, two ``runner server`` replicas behind Debian's haproxy (health-checked), and two
supervisors, each in a network namespace of its own (a "node"), reaching the balancer through
its veth link. Node b talks through :class:`~faults.proxy.ClaimDropper`, which can lose one
claim answer. Sandboxes use the process backend, each node with its own uid range.

The workload's tasks write ``RAN task run try=N`` to their attempt log (stderr) before doing
anything else: one line per execution of user code, on the node that ran it.
"""

from __future__ import annotations

import collections
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import psutil
import psycopg
import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runner"))
from stack import Stack, free_port
from test_failover_e2e import HAPROXY_CFG

from faults.netns import Node
from faults.proxy import ClaimDropper
from server.postgres import PostgresCluster

AUDIENCE = "privsep-faults"
HEARTBEAT_TIMEOUT = 10  # server.supervisor_heartbeat_timeout: short, so the suite stays short
PARALLELISM = 3
UID_FIRST = {"a": 214_000, "b": 214_100}
UID_COUNT = 50
QUICK, SLEEPY, SLEEP_S = 4, 3, 5
TASKS = sorted([*(f"q{i}" for i in range(QUICK)), *(f"s{i}" for i in range(SLEEPY)), "last"])
MARKER = re.compile(r"^RAN (\S+) (\S+) try=(\d+)$", re.MULTILINE)

WORKFLOW = textwrap.dedent(f"""
    import sys
    import time
    from privsep.client import Context, Workflow

    wf = Workflow("faults", schedule=None)

    def mark(ctx: Context) -> None:
        print(f"RAN {{ctx.task_id}} {{ctx.run_id}} try={{ctx.try_number}}", file=sys.stderr,
              flush=True)

    def quick(ctx: Context) -> None:
        mark(ctx)
        time.sleep(0.2)

    def sleepy(ctx: Context) -> None:
        mark(ctx)
        time.sleep({SLEEP_S})

    tasks = [wf.task(task_id=f"q{{i}}", retries=2)(quick) for i in range({QUICK})]
    tasks += [wf.task(task_id=f"s{{i}}", retries=2)(sleepy) for i in range({SLEEPY})]

    @wf.task(upstream=tasks, retries=2)
    def last(ctx: Context) -> None:
        mark(ctx)
""")


def _healthy(url: str) -> bool:
    try:
        return requests.get(url + "/v1/health", timeout=2).status_code == 200
    except requests.RequestException:
        return False


def haproxy_binary() -> str:
    for path in ("/usr/sbin/haproxy", "/usr/bin/haproxy"):
        if Path(path).exists():
            return path
    raise AssertionError("haproxy is not installed (scripts/test installs it)")


class Cluster:
    """Everything above, in ``stack.home``; :meth:`start` then :meth:`stop`."""

    def __init__(self, postgres: PostgresCluster, home: Path) -> None:
        self.postgres = postgres
        self.database = postgres.create_database()
        self.stack = Stack(
            home,
            uid_first=UID_FIRST["a"],
            PRIVSEP__DATABASE__URL=postgres.url(self.database),
            PRIVSEP__SERVER__AUDIENCE=AUDIENCE,
            PRIVSEP__SERVER__SUPERVISOR_HEARTBEAT_TIMEOUT=str(HEARTBEAT_TIMEOUT),
            PRIVSEP__SERVER__SCHEDULER_INTERVAL="1",
            PRIVSEP__SUPERVISOR__PARALLELISM=str(PARALLELISM),
            PRIVSEP__SANDBOX__UID_COUNT=str(UID_COUNT),
        )
        self.replica_ports = {"a": free_port(), "b": free_port()}
        self.lb_port = free_port()
        self.nodes = {"a": Node("a"), "b": Node("b")}
        self.proxy: ClaimDropper | None = None
        self.supervisor_ids: dict[str, str] = {}

    # --- starting and stopping ---------------------------------------------------------------

    def start(self) -> None:
        stack = self.stack
        stack.setup()
        (stack.home / "workflows" / "faults.py").write_text(WORKFLOW)
        for name, node in self.nodes.items():
            node.create()
            key = self.node_home(name) / "credentials" / "supervisor.key"
            self.node_home(name).mkdir(mode=0o700)
            for args in (
                ("credentials", "create", "--out", str(key)),
                ("supervisors", "register", f"sup-{name}", "--public-key", f"{key}.pub"),
            ):
                done = stack.runner(*args)
                assert done.returncode == 0, (args, done.stderr)
        for name in self.replica_ports:
            self.start_replica(name)
        self._start_haproxy()
        node_b = self.nodes["b"]
        self.proxy = ClaimDropper((node_b.host_ip, free_port()), ("127.0.0.1", self.lb_port))
        for name in self.nodes:
            self.start_supervisor(name)
        with self._db() as conn:
            rows = conn.execute("SELECT name, id FROM supervisors").fetchall()
        self.supervisor_ids = {str(n).removeprefix("sup-"): str(i) for n, i in rows}

    def stop(self) -> None:
        try:
            self.stack.stop_all()
        finally:
            if self.proxy is not None:
                self.proxy.close()
            for node in self.nodes.values():
                node.destroy()
            self.postgres.drop_database(self.database)

    def node_home(self, name: str) -> Path:
        return self.stack.home / f"node-{name}"

    def _db(self) -> psycopg.Connection[Any]:
        url = self.postgres.url(self.database).replace("postgresql+psycopg://", "postgresql://")
        return psycopg.connect(url, autocommit=True)

    def _start_haproxy(self) -> None:
        binds = [f"    bind 127.0.0.1:{self.lb_port}"]
        binds += [f"    bind {n.host_ip}:{self.lb_port}" for n in self.nodes.values()]
        cfg = self.stack.home / "haproxy.cfg"
        cfg.write_text(
            HAPROXY_CFG.format(
                binds="\n".join(binds), a=self.replica_ports["a"], b=self.replica_ports["b"]
            )
        )
        out = open(self.stack.home / "haproxy.out", "w")  # noqa: SIM115 - closed with it
        self.stack.procs["haproxy"] = subprocess.Popen(
            [haproxy_binary(), "-db", "-f", str(cfg)], stdout=out, stderr=subprocess.STDOUT
        )
        self.stack.url = f"http://127.0.0.1:{self.lb_port}"
        self.stack.env["PRIVSEP__SERVER__URL"] = self.stack.url
        self.stack.wait_for(lambda: _healthy(self.stack.url), 30, "haproxy to answer")

    def start_replica(self, name: str) -> None:
        port = self.replica_ports[name]
        env = dict(self.stack.env)
        env["PRIVSEP__SERVER__BIND"] = f"127.0.0.1:{port}"
        env["PRIVSEP__SERVER__SOCKET"] = str(self.stack.home / "run" / f"replica-{name}.sock")
        out = open(self.stack.home / f"replica-{name}.out", "a")  # noqa: SIM115
        self.stack.procs[f"replica-{name}"] = subprocess.Popen(
            [sys.executable, "-m", "privsep", "server"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
        )
        url = f"http://127.0.0.1:{port}"
        self.stack.wait_for(lambda: _healthy(url), 60, f"replica {name} to answer")

    def start_supervisor(self, name: str) -> None:
        node = self.nodes[name]
        if name == "b":
            assert self.proxy is not None
            host, port = self.proxy.server.getsockname()[:2]
            url = f"http://{host}:{port}"
        else:
            url = f"http://{node.host_ip}:{self.lb_port}"
        env = dict(self.stack.env)
        env.update(
            {
                "PRIVSEP_HOME": str(self.node_home(name)),
                "PRIVSEP__CORE__WORKFLOWS_DIR": str(self.stack.home / "workflows"),
                "PRIVSEP__SUPERVISOR__NAME": f"sup-{name}",
                # One node discovers; the folder is shared, as one checkout on every node.
                "PRIVSEP__SUPERVISOR__DISCOVERY": "true" if name == "a" else "false",
                "PRIVSEP__SANDBOX__UID_FIRST": str(UID_FIRST[name]),
                "PRIVSEP__SERVER__URL": url,
            }
        )
        out = open(self.stack.home / f"supervisor-{name}.out", "a")  # noqa: SIM115
        self.stack.procs[f"supervisor-{name}"] = subprocess.Popen(
            node.wrap([sys.executable, "-m", "privsep", "supervisor"]),
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def kill(self, proc_name: str) -> int:
        """SIGKILL, no goodbye; the dead process leaves the stack's watch list."""
        proc = self.stack.procs.pop(proc_name)
        proc.send_signal(signal.SIGKILL)
        return proc.wait(timeout=30)

    def tree(self, proc_name: str) -> list[psutil.Process]:
        """A running process and everything below it."""
        root = psutil.Process(self.stack.procs[proc_name].pid)
        return [root, *root.children(recursive=True)]

    # --- the workload ------------------------------------------------------------------------

    def trigger(self, count: int) -> list[str]:
        return [self.stack.trigger_when_parsed("faults") for _ in range(count)]

    def _read(self, path: str) -> Any:
        """An operator read; a 503 (the database just came back) is asked again, bounded."""
        deadline = time.monotonic() + 30
        while True:
            resp = self.stack.operator("GET", path)
            if resp.status_code != 503 or time.monotonic() > deadline:
                assert resp.status_code == 200, (path, resp.status_code, resp.text)
                return resp.json()
            time.sleep(min(2.0, float(resp.headers.get("Retry-After", "1"))))

    def attempts(self, runs: Iterable[str]) -> list[dict[str, Any]]:
        found = []
        for run_id in runs:
            answer = self._read(f"/v1/operator/runs/{run_id}/attempts")
            found += [dict(a, run_id=run_id) for a in answer["attempts"]]
        return found

    def run_states(self, runs: Iterable[str]) -> list[str]:
        states = {r["id"]: r["state"] for r in self._read("/v1/operator/runs")["runs"]}
        return [str(states.get(run_id, "")) for run_id in runs]

    def running_on(self, node: str, runs: Iterable[str]) -> list[dict[str, Any]]:
        sid = self.supervisor_ids[node]
        return [
            a for a in self.attempts(runs) if a["state"] == "running" and a["supervisor_id"] == sid
        ]

    def wait(self, predicate: Any, timeout: float, what: str) -> Any:
        return self.stack.wait_for(predicate, timeout, what)

    def wait_closed(self, runs: list[str], timeout: float = 180) -> None:
        self.wait(
            lambda: set(self.run_states(runs)) == {"success"},
            timeout,
            "every run to close in success",
        )

    def markers(self) -> list[tuple[str, str, int, str]]:
        """(task, run, try, node) of every execution of user code, from the attempt logs."""
        found = []
        for name in self.nodes:
            for log in (self.node_home(name) / "state" / "logs").glob("task-*.log"):
                text = log.read_text(errors="replace")
                found += [(m[1], m[2], int(m[3]), name) for m in MARKER.finditer(text)]
        return found

    # --- what must hold ----------------------------------------------------------------------

    def assert_invariants(self, runs: list[str], may_rerun: Iterable[dict[str, Any]]) -> None:
        """Every task succeeded once; user code ran twice only where its first sandbox was on
        a node that died or was cut off at the fault (``may_rerun``: those attempts); every
        run closed; no sandbox or supervisor process is left over."""
        allowed = {(a["run_id"], a["task_id"], a["try_number"]) for a in may_rerun}
        attempts = self.attempts(runs)
        assert set(self.run_states(runs)) == {"success"}
        for run_id in runs:
            mine = [a for a in attempts if a["run_id"] == run_id]
            successes = collections.Counter(a["task_id"] for a in mine if a["state"] == "success")
            assert sorted(successes) == TASKS, mine
            assert set(successes.values()) == {1}, successes
        ran = collections.Counter((r, t, n) for t, r, n, _ in self.markers() if r in runs)
        assert set(ran.values()) <= {1}, ran  # one attempt's code never runs twice
        for a in attempts:
            key = (a["run_id"], a["task_id"], a["try_number"])
            if a["state"] == "success":
                assert ran[key] == 1, (a, "a successful attempt's code ran once")
            elif ran[key]:
                # User code ran in an attempt that did not succeed: only a sandbox that was
                # on the failed node at the fault may have.
                assert key in allowed, (a, sorted(allowed))
        self.assert_no_orphans()

    def assert_no_orphans(self) -> None:
        """Once the work is done, no process runs under a sandbox uid, and every process of a
        node home belongs to that node's live supervisor."""

        def leftovers() -> list[str]:
            live = set()
            for name in self.nodes:
                proc_name = f"supervisor-{name}"
                if proc_name in self.stack.procs:
                    live |= {p.pid for p in self.tree(proc_name)}
            homes = {f"PRIVSEP_HOME={self.node_home(n)}" for n in self.nodes}
            found = []
            for proc in psutil.process_iter(["pid", "uids", "cmdline"]):
                try:
                    uid = proc.info["uids"].real if proc.info["uids"] else -1
                    sandboxed = any(
                        first <= uid < first + UID_COUNT for first in UID_FIRST.values()
                    )
                    env = proc.environ() if proc.pid not in live else {}
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    continue
                ours = any(f"{k}={v}" in homes for k, v in env.items())
                if sandboxed or (ours and proc.pid not in live):
                    found.append(f"{proc.pid} uid={uid} {proc.info['cmdline']}")
            return found

        try:
            self.wait(lambda: not leftovers(), 30, "no orphan process")
        except AssertionError:
            raise AssertionError(f"orphan processes: {leftovers()}") from None

    def await_progress(self, runs: list[str], since: int, timeout: float, what: str) -> None:
        """Work resumes: more attempts than ``since`` succeed within ``timeout``."""
        self.wait(lambda: self.successes(runs) > since, timeout, what)

    def successes(self, runs: list[str]) -> int:
        return sum(a["state"] == "success" for a in self.attempts(runs))

    def supervisor_alive(self, name: str) -> bool:
        """The server heard node ``name`` within the last two heartbeat intervals."""
        with self._db() as conn:
            row = conn.execute(
                "SELECT now() AT TIME ZONE 'utc' - last_heartbeat_at < interval '3 seconds'"
                " FROM supervisors WHERE name = %s",
                (f"sup-{name}",),
            ).fetchone()
        return bool(row and row[0])


def settle(seconds: float) -> None:
    """A fault that must last a while (an outage) lasts this long; never a wait for a state."""
    time.sleep(seconds)
