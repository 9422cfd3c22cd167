"""The system the end-to-end figures run: ``runner standalone`` and the workflows it runs.

:mod:`benchmarks.bench_e2e` measures it; :mod:`benchmarks.bench_soak` and
:mod:`benchmarks.bench_wakeups` drive it too. Kept apart from the figures so that how the
system is started and read (its process roles, its database, its CPU accounting) reads in one
place, and each figure's module holds only what it measures.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil

from benchmarks.cpu_accounting import CpuMeter, process_tree

UID_FIRST = 180_000


# --- the workflows --------------------------------------------------------------------------

TRIVIAL = '''\
"""{n} independent tasks that do nothing."""
from privsep.client import Context, Workflow

wf = Workflow("{workflow_id}", schedule=None)


def trivial(ctx: Context) -> None:
    return None


for _i in range({n}):
    wf.task(task_id=f"t{{_i:04d}}")(trivial)
'''

CHAIN = '''\
"""A chain of {n} tasks; each logs when its user code starts and ends."""
import time

from privsep.client import Context, Workflow

wf = Workflow("e2e_chain", schedule=None)


def step(ctx: Context) -> None:
    started = time.time()  # the first statement: "downstream user code running"
    ctx.log.info("E2E-STEP %.6f %.6f", started, time.time())


_previous = None
for _i in range({n}):
    _previous = wf.task(task_id=f"c{{_i:03d}}", upstream=[_previous] if _previous else [])(step)
'''

SLEEPERS = '''\
"""{n} independent tasks that sleep until the benchmark sends them SIGUSR1."""
import signal
import time

from privsep.client import Context, Workflow

wf = Workflow("e2e_sleep", schedule=None)


def sleeper(ctx: Context) -> None:
    released = []
    signal.signal(signal.SIGUSR1, lambda *_: released.append(True))
    ctx.log.info("{mark} %.6f", time.time())
    while not released:
        time.sleep(0.5)


for _i in range({n}):
    wf.task(task_id=f"s{{_i:04d}}")(sleeper)
'''

SMALL = '''\
"""A small definition file: one workflow, two tasks."""
from privsep.client import Context, Workflow

wf = Workflow("{workflow_id}", schedule=None)


@wf.task
def extract(ctx: Context) -> int:
    return 1


@wf.task(upstream=[extract])
def load(ctx: Context) -> int:
    return int(ctx.xcom_pull("extract")) + 1
'''


def write_atomically(folder: Path, name: str, text: str) -> Path:
    """Discovery skips dot files, so a file written under a dot name and renamed is never
    seen half-written."""
    tmp = folder / f".{name}.tmp"
    tmp.write_text(text)
    tmp.chmod(0o644)
    path = folder / name
    os.rename(tmp, path)
    return path


def _cpu(proc: psutil.Process, *, children: bool = False) -> float:
    try:
        t = proc.cpu_times()
    except psutil.Error:
        return 0.0
    used = t.children_user + t.children_system if children else t.user + t.system
    return float(used)


# --- runner standalone ------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Standalone:
    """``runner standalone`` serving (no ``--once``) until :meth:`stop`; the operator's API and
    a read-only view of its database."""

    def __init__(
        self, home: Path, workflows: Path, parallelism: int | None, uid_count: int
    ) -> None:
        self.home = home
        self.workflows = workflows
        self.parallelism = parallelism
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("PRIVSEP")}
        self.env.update(
            {
                "PRIVSEP__SERVER__BIND": f"127.0.0.1:{self.port}",
                "PRIVSEP__SERVER__URL": self.url,
                "PRIVSEP__SANDBOX__UID_FIRST": str(UID_FIRST),
                "PRIVSEP__SANDBOX__UID_COUNT": str(uid_count),
                "PRIVSEP__SUPERVISOR__DISCOVERY_INTERVAL": "0.2",
                "PRIVSEP__SUPERVISOR__DRAIN_GRACE": "10",
            }
        )
        self.cpu = CpuMeter()
        self.proc: subprocess.Popen[bytes] | None = None
        self.op: Any = None
        self.db: Any = None
        self.log = home.parent / f"standalone-{self.port}.log"

    # lifecycle

    def start(self) -> None:
        argv = [
            sys.executable,
            "-m",
            "privsep",
            "standalone",
            "--home",
            str(self.home),
            "--workflows",
            str(self.workflows),
        ]
        if self.parallelism is not None:
            argv += ["--parallelism", str(self.parallelism)]
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                self.cpu.wrap(argv),
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.cpu.pid = self.proc.pid
        self.op = self._operator_when_ready()
        from privsep.server.db import Database, sqlite_url_for

        self.db = Database.from_url(sqlite_url_for(self.home / "state" / "privsep.db"))

    def _operator_when_ready(self, timeout: float = 120.0) -> Any:
        from privsep.runner.cli.operator_client import OperatorClient
        from privsep.runner.errors import CommandError
        from privsep.secrets.keys import KeyFormatError

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            op = OperatorClient(self.url, str(self.home / "credentials" / "operator.key"))
            try:
                op.call("GET", "/v1/operator/policy")
                return op
            except (CommandError, OSError, KeyFormatError):
                op.close()
                time.sleep(0.2)  # not up yet, or the key is still being written
        raise RuntimeError(f"runner standalone did not come up in {timeout:.0f} s\n{self.output()}")

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(
                f"runner standalone exited with status {self.proc.returncode}\n{self.output()}"
            )

    def output(self) -> str:
        parts = []
        logs = [self.log]
        logs += sorted((self.home / "state" / "standalone").glob("*.log"))
        for path in logs:
            with contextlib.suppress(OSError):
                parts.append(f"--- {path.name}\n" + path.read_text(errors="replace")[-3000:])
        return "\n".join(parts)

    def stop(self) -> None:
        if self.db is not None:
            self.db.dispose()
        if self.proc is None or self.proc.poll() is not None:
            self.cpu.close()
            return
        tree = process_tree(self.proc.pid)
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for proc in tree[1:]:  # only what this run started, by pid, if it outlived the stop
            with contextlib.suppress(psutil.Error):
                proc.kill()
        psutil.wait_procs(tree[1:], timeout=10)
        self.cpu.close()

    # processes

    def processes(self) -> dict[str, list[psutil.Process]]:
        """The live tree by role: standalone, server (and any workers), supervisor, zygote,
        sandboxes (everything under the zygote) and other (anything else)."""
        assert self.proc is not None
        roles: dict[str, list[psutil.Process]] = {
            name: [] for name in ("standalone", "server", "supervisor", "zygote", "sandboxes")
        }
        roles["other"] = []
        known: dict[int, tuple[psutil.Process, str, int]] = {}
        for proc in process_tree(self.proc.pid):
            with contextlib.suppress(psutil.Error):
                known[proc.pid] = (proc, " ".join(proc.cmdline()), proc.ppid())

        root = self.proc.pid

        def role(pid: int) -> str:
            _, cmd, ppid = known[pid]
            if pid == root:
                return "standalone"
            if cmd.endswith("privsep server"):
                return "server"
            if cmd.endswith("privsep supervisor"):
                return "supervisor"
            parent = role(ppid) if ppid in known else "other"
            if parent == "supervisor" and "privsep.sandbox._zygote" in cmd:
                return "zygote"
            if parent in ("zygote", "sandboxes"):
                return "sandboxes"
            if parent == "server":
                return "server"  # its workers, if it runs more than one
            return "other"

        for pid, (proc, _, _) in known.items():
            roles[role(pid)].append(proc)
        return roles

    def cpu_by_role(self) -> dict[str, float]:
        """CPU seconds so far of the long-lived processes, and of the sandboxes the zygote
        has reaped (the zygote or each sandbox's monitor reaps its user process)."""
        roles = self.processes()
        out = {
            name: sum(_cpu(p) for p in roles[name])
            for name in ("standalone", "server", "supervisor", "zygote", "other")
        }
        out["sandboxes"] = sum(_cpu(p, children=True) for p in roles["zygote"]) + sum(
            _cpu(p) + _cpu(p, children=True) for p in roles["sandboxes"]
        )
        return out

    # the operator's side

    def trigger(self, workflow_id: str) -> str:
        return str(
            self.op.call("POST", f"/v1/operator/workflows/{workflow_id}/runs", body={})["id"]
        )

    def wait_parsed(self, workflow_ids: Sequence[str], timeout: float = 120.0) -> None:
        from sqlalchemy import select

        from privsep.server.db.models import Workflow

        wanted = set(workflow_ids)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            with self.db.read_session() as session:
                active = set(
                    session.scalars(
                        select(Workflow.id).where(Workflow.id.in_(wanted), Workflow.active)
                    )
                )
            if active == wanted:
                return
            time.sleep(0.1)
        raise RuntimeError(f"not parsed in {timeout:.0f} s: {sorted(wanted - active)[:5]}")

    def wait_run(self, run_id: str, timeout: float, *, must_succeed: bool = True) -> Any:
        """Poll the run in the database until it ends; fail loudly unless it succeeded (or,
        with ``must_succeed=False``, return it whatever its end, or None on a timeout)."""
        from sqlalchemy import select

        from privsep.server.db.models import Run, RunState, TaskAttempt

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            with self.db.read_session() as session:
                run = session.get(Run, run_id)
                if run is not None and run.state in (RunState.SUCCESS, RunState.FAILED):
                    if run.state != RunState.SUCCESS and must_succeed:
                        errors = session.scalars(
                            select(TaskAttempt.error).where(
                                TaskAttempt.run_id == run_id, TaskAttempt.error.is_not(None)
                            )
                        ).all()
                        raise RuntimeError(f"run {run_id} failed: {errors[:3]}\n{self.output()}")
                    session.expunge(run)
                    return run
            time.sleep(0.1)
        if not must_succeed:
            return None
        raise RuntimeError(f"run {run_id} not done in {timeout:.0f} s\n{self.output()}")

    def attempts(self, run_id: str) -> list[Any]:
        from sqlalchemy import select

        from privsep.server.db.models import TaskAttempt

        with self.db.read_session() as session:
            rows = list(session.scalars(select(TaskAttempt).where(TaskAttempt.run_id == run_id)))
            for row in rows:
                session.expunge(row)
        return rows

    def attempt_log(self, attempt_id: str) -> str:
        path = self.home / "state" / "logs" / f"task-{attempt_id}.log"
        try:
            return path.read_text(errors="replace")
        except OSError:
            return ""


def set_file_parallelism(home: Path, parallelism: int) -> None:
    """Set ``[supervisor] parallelism`` in the home's privsep.toml (kept private)."""
    config = home / "privsep.toml"
    text = config.read_text()
    line = f"parallelism = {parallelism}"
    if re.search(r"(?m)^parallelism = \d+$", text):
        text = re.sub(r"(?m)^parallelism = \d+$", line, text)
    else:
        text += f"\n# Set by the e2e benchmark.\n[supervisor]\n{line}\n"
    config.write_text(text)
    config.chmod(0o600)


@contextlib.contextmanager
def standalone(
    home: Path, workflows: Path, *, parallelism: int | None, uid_count: int
) -> Iterator[Standalone]:
    """``parallelism=None``: the supervisor's parallelism comes from the home's privsep.toml
    (see :func:`set_file_parallelism`), so that a SIGHUP can change it."""
    system = Standalone(home, workflows, parallelism, uid_count)
    try:
        system.start()
        yield system
    finally:
        system.stop()


def timestamp(value: datetime | None) -> float:
    if value is None:
        raise RuntimeError("an attempt has no timestamp")
    return value.timestamp()
