"""Authenticated small RPCs against the real server (issue 3's benchmark).

What is measured: ``GET /v1/task/variables/<key>`` with a real task token, which is what a task
does to read a variable: a JWT check, the attempt check, the policy check and the variable
read, server side. 16 concurrent keep-alive clients, over TCP and over the unix socket, with
2 and 3 pre-forked workers on the machine's cores. The baseline beside each figure is the same
variable read done directly through SQLAlchemy, in this process, on the same database file.

How: nothing is stubbed. A temporary ``PRIVSEP_HOME`` is prepared with the real CLI (``runner
keys rotate``, ``runner db upgrade``, ``runner credentials create``, ``runner supervisors
register``), ``runner server`` is started with ``PRIVSEP__SERVER__*`` overrides, and the token
is obtained the way a supervisor obtains one: a session from a signed assertion, a parse job
claimed and answered with a workflow definition, an operator session that sets a variable and
grants it, a triggered run, and a claimed task. The load comes from
:mod:`benchmarks.loadgen` in its own process. Traffic goes only to 127.0.0.1 and the socket.

A last configuration hits ``GET /v1/jwks`` (no token, no database) as the HTTP stack's floor,
so the figures show how much of a request's cost is the framework and how much is ours.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from benchmarks.bench_baselines import direct_reader
from benchmarks.harness import Row, Stats, figure, progress, rounds_rate, timed_rounds

NAME = "rpc"
DESCRIPTION = "authenticated GET of a variable through runner server: TCP and unix socket"

REPO = Path(__file__).resolve().parent.parent
WORKER_COUNTS = (2, 3)
CONCURRENCY = 16
WORKFLOW_ID = "bench_rpc"
VARIABLE_KEY = "bench_rpc_var"
THROUGHPUT_TARGET = ">= 5000 req/s"
LATENCY_TARGET = "p99 <= 10 ms"
READY_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Timing:
    """How long each configuration runs: a warm-up, then rounds whose median is the figure."""

    warmup: float
    rounds: int
    round_seconds: float


SMOKE = Timing(warmup=0.2, rounds=2, round_seconds=0.4)
FULL = Timing(warmup=1.0, rounds=5, round_seconds=2.0)


# --- the server's home, prepared with the real CLI ---------------------------------------------


def runner_command() -> list[str]:
    """The ``runner`` CLI of the interpreter running the benchmarks."""
    script = Path(sys.executable).parent / "runner"
    if script.exists():
        return [str(script)]
    return [
        sys.executable,
        "-c",
        "import sys; from privsep.runner.cli.main import main; sys.exit(main())",
    ]


class Home:
    """A throw-away ``PRIVSEP_HOME`` with a key ring, a migrated SQLite database, a registered
    supervisor credential and an operator credential."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.supervisor_key = root / "credentials" / "supervisor.key"
        self.operator_key = root / "credentials" / "operator.key"
        self.socket = root / "run" / "server" / "api.sock"
        self.database = root / "state" / "privsep.db"

    def env(self, **overrides: str) -> dict[str, str]:
        """The environment minus any PRIVSEP_* of the caller's (a PostgreSQL URL or another
        home must not leak in), plus this home and ``overrides`` as ``PRIVSEP__SERVER__*``."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("PRIVSEP")}
        env["PRIVSEP_HOME"] = str(self.root)
        env["PRIVSEP__SERVER__OPERATOR_PUBLIC_KEY"] = f"{self.operator_key}.pub"
        for key, value in overrides.items():
            env[f"PRIVSEP__SERVER__{key.upper()}"] = value
        return env

    def runner(self, *args: str) -> None:
        proc = subprocess.run(
            [*runner_command(), *args],
            env=self.env(),
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            raise RuntimeError(
                f"runner {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}"
            )

    def prepare(self) -> None:
        self.root.chmod(0o700)
        self.runner("keys", "rotate")
        self.runner("db", "upgrade")
        self.runner("credentials", "create", "--out", str(self.supervisor_key))
        self.runner("credentials", "create", "--out", str(self.operator_key))
        self.runner(
            "supervisors", "register", "bench", "--public-key", f"{self.supervisor_key}.pub"
        )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    """``runner server`` in its own session, stopped with SIGTERM (SIGKILL to its process
    group if it lingers), its output kept in a log for the error message."""

    def __init__(self, home: Home, workers: int) -> None:
        self.home = home
        self.workers = workers
        self.port = free_port()
        self.audience = f"http://127.0.0.1:{self.port}"
        self.log = home.root / f"server-{workers}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = self.home.env(
            bind=f"127.0.0.1:{self.port}", url=self.audience, workers=str(self.workers)
        )
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [*runner_command(), "server"],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._wait_ready()

    def _wait_ready(self) -> None:
        """Until /v1/health answers and every worker is forked."""
        assert self.proc is not None
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"runner server exited {self.proc.returncode}:\n{self.output()}")
            with contextlib.suppress(OSError, http.client.HTTPException):
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                try:
                    conn.request("GET", "/v1/health")
                    healthy = conn.getresponse().status == 200
                finally:
                    conn.close()
                if healthy and len(self.worker_processes()) >= self.workers:
                    return
            time.sleep(0.05)
        raise RuntimeError(f"runner server not ready after {READY_TIMEOUT_S} s:\n{self.output()}")

    def worker_processes(self) -> list[psutil.Process]:
        """The processes that serve requests: the forked workers, or the server itself when it
        runs a single worker in-process."""
        assert self.proc is not None
        with contextlib.suppress(psutil.Error):
            parent = psutil.Process(self.proc.pid)
            return parent.children(recursive=True) if self.workers > 1 else [parent]
        return []

    def cpu_seconds(self) -> float:
        """User + system CPU of the server and every worker so far."""
        assert self.proc is not None
        total = 0.0
        processes = {p.pid: p for p in self.worker_processes()}
        processes.setdefault(self.proc.pid, psutil.Process(self.proc.pid))
        for proc in processes.values():
            with contextlib.suppress(psutil.Error):
                times = proc.cpu_times()
                total += times.user + times.system
        return total

    def connections_per_worker(self, transport: str) -> list[int]:
        """How the clients' keep-alive connections are spread over the workers, which decides
        how many of the workers actually serve: a worker accepts every connection that is
        pending when it wakes up, so a burst of connects can land on one worker."""
        counts: list[int] = []
        for proc in self.worker_processes():
            try:
                if transport == "tcp":
                    conns = proc.net_connections(kind="tcp")
                    count = sum(
                        1 for c in conns if c.status == "ESTABLISHED" and c.laddr.port == self.port
                    )
                else:  # the inherited listening socket has the same path: do not count it
                    conns = proc.net_connections(kind="unix")
                    count = sum(1 for c in conns if c.laddr == str(self.home.socket)) - 1
            except psutil.Error:
                count = -1
            counts.append(count)
        return counts

    def output(self) -> str:
        with contextlib.suppress(OSError):
            return self.log.read_text(errors="replace")[-4000:]
        return ""

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@contextlib.contextmanager
def running_server(home: Home, workers: int) -> Iterator[Server]:
    server = Server(home, workers)
    try:
        server.start()
        yield server
    finally:
        server.stop()


# --- a task token, obtained the way a supervisor obtains one -----------------------------------


class Api:
    """JSON over one keep-alive TCP connection, for setting the scene (not for the load)."""

    def __init__(self, port: int) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)

    def call(self, method: str, path: str, body: object = None, token: str = "") -> Any:
        headers = {"Content-Type": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        payload = None if body is None else json.dumps(body)
        self.conn.request(method, path, body=payload, headers=headers)
        resp = self.conn.getresponse()
        text = resp.read().decode()
        if not 200 <= resp.status < 300:
            raise RuntimeError(f"{method} {path} answered {resp.status}: {text}")
        return json.loads(text) if text else None

    def close(self) -> None:
        self.conn.close()


def _session(api: Api, path: str, key_file: Path, name: str, audience: str) -> str:
    from privsep.secrets.keys import load_private_key
    from privsep.secrets.tokens import create_assertion

    assertion = create_assertion(
        load_private_key(str(key_file)), supervisor_name=name, audience=audience
    )
    return str(api.call("POST", path, {"assertion": assertion})["token"])


def _claim(api: Api, supervisor: str, kind: str) -> dict[str, Any]:
    items = api.call("POST", "/v1/supervisor/claim", {"kinds": [kind], "max_items": 1}, supervisor)[
        "items"
    ]
    if len(items) != 1:
        raise RuntimeError(f"claiming one {kind} item returned {len(items)}")
    item: dict[str, Any] = items[0]
    return item


def define_workflow_and_variable(api: Api, home: Home, audience: str) -> None:
    """Once per home: the workflow (through a parse job), the variable and its grant."""
    supervisor = _session(api, "/v1/supervisor/session", home.supervisor_key, "bench", audience)
    api.call(
        "POST",
        "/v1/supervisor/parse-jobs",
        {"uri": f"file:///workflows/{WORKFLOW_ID}-{uuid.uuid4().hex[:8]}.py"},
        supervisor,
    )
    parse = _claim(api, supervisor, "parse")
    definition = {
        "workflow_id": WORKFLOW_ID,
        "schedule": None,
        "tasks": [{"task_id": "read", "module": "workflows.bench", "qualname": "read"}],
    }
    api.call("POST", "/v1/parse/result", {"workflows": [definition]}, parse["token"])
    operator = _session(api, "/v1/operator/session", home.operator_key, "operator", audience)
    api.call(
        "PUT", f"/v1/operator/variables/{VARIABLE_KEY}", {"value": "s3://bench/target"}, operator
    )
    api.call(
        "POST",
        "/v1/operator/policy",
        {"workflow_pattern": WORKFLOW_ID, "kind": "variable", "name_pattern": VARIABLE_KEY},
        operator,
    )


def task_token(api: Api, home: Home, audience: str) -> str:
    """A running attempt's token: trigger a run as the operator, claim its task."""
    operator = _session(api, "/v1/operator/session", home.operator_key, "operator", audience)
    api.call("POST", f"/v1/operator/workflows/{WORKFLOW_ID}/runs", {"conf": {}}, operator)
    supervisor = _session(api, "/v1/supervisor/session", home.supervisor_key, "bench", audience)
    token = str(_claim(api, supervisor, "task")["token"])
    value = api.call("GET", f"/v1/task/variables/{VARIABLE_KEY}", token=token)["value"]
    if value != "s3://bench/target":
        raise RuntimeError(f"the task token read {value!r}, not the variable that was set")
    return token


# --- load -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadResult:
    throughput: Stats  # requests/s per round
    latency_ms: Stats  # pooled over every measured request: median and p99
    server_cpu_us: float  # server CPU per request, all workers
    client_cpu_us: float  # load generator CPU per request
    requests: int
    connections: list[int]  # client connections each worker held, sampled mid-load


def load(server: Server, *, path: str, token: str, transport: str, timing: Timing) -> LoadResult:
    config = {
        "tcp": ["127.0.0.1", server.port] if transport == "tcp" else None,
        "unix": str(server.home.socket) if transport == "unix" else None,
        "path": path,
        "token": token,
        "concurrency": CONCURRENCY,
        "warmup": timing.warmup,
        "rounds": timing.rounds,
        "round_seconds": timing.round_seconds,
    }
    cpu_before = server.cpu_seconds()
    # The config (with the token) goes through a private file on stdin, not the command line.
    config_file = server.home.root / "load.json"
    fd = os.open(config_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(config, fh)
    with config_file.open("rb") as stdin:
        proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.loadgen"],
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
    time.sleep(timing.warmup + timing.round_seconds / 2)
    spread = server.connections_per_worker(transport)
    try:
        stdout, stderr = proc.communicate(
            timeout=60 + timing.warmup + timing.rounds * timing.round_seconds
        )
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    cpu_used = server.cpu_seconds() - cpu_before
    if proc.returncode != 0:
        raise RuntimeError(f"load generator exited {proc.returncode}:\n{stderr[-4000:]}")
    out = json.loads(stdout)
    bad = {s: n for s, n in out["statuses"].items() if s != "200"}
    if bad:
        raise RuntimeError(f"{path} over {transport}: non-200 answers {bad}\n{server.output()}")
    rates = [r["requests"] / r["seconds"] for r in out["rounds"] if r["seconds"] > 0]
    return LoadResult(
        throughput=Stats.of(rates, higher_is_better=True),
        latency_ms=Stats(out["p50_ms"], out["p99_ms"], out["requests_measured"]),
        server_cpu_us=cpu_used / out["requests_total"] * 1e6,
        client_cpu_us=out["client_cpu_s"] / max(out["requests_measured"], 1) * 1e6,
        requests=out["requests_total"],
        connections=spread,
    )


@dataclass(frozen=True)
class Direct:
    rate: Stats  # reads/s, one thread
    latency_ms: Stats
    cpu_us: float


def direct_baseline(home: Home, timing: Timing) -> Direct:
    """The same read, in this process, on the server's own database file, while it idles."""
    from privsep.server.db import sqlite_url_for

    with direct_reader(sqlite_url_for(home.database), VARIABLE_KEY) as read:
        cpu_before = time.process_time()
        rounds = timed_rounds(
            read,
            rounds=timing.rounds,
            seconds=timing.round_seconds / 2,
            warmup_seconds=timing.warmup / 2,
        )
        cpu = time.process_time() - cpu_before
    samples = [s for r in rounds for s in r]
    return Direct(
        rate=rounds_rate(rounds),
        latency_ms=Stats.of(samples).scaled(1e3),
        cpu_us=cpu / len(samples) * 1e6,
    )


def rpc_rows(label: str, result: LoadResult, direct: Direct) -> list[Row]:
    note = (
        f"{result.requests} requests; connections per worker "
        f"{'+'.join(map(str, result.connections))}; "
        f"load generator CPU {result.client_cpu_us:.0f} µs/request"
    )
    return [
        figure(
            f"{label}: throughput",
            result.throughput,
            "req/s",
            baseline=direct.rate,
            baseline_measure="direct SQLAlchemy read, 1 thread",
            baseline_unit="reads/s",
            target=THROUGHPUT_TARGET,
            higher_is_better=True,
            note=note,
        ),
        figure(
            f"{label}: latency",
            result.latency_ms,
            "ms",
            baseline=direct.latency_ms,
            baseline_measure="direct read",
            target=LATENCY_TARGET,
            note=note,
        ),
        figure(
            f"{label}: server CPU per request",
            Stats.single(result.server_cpu_us),
            "µs",
            baseline=Stats.single(direct.cpu_us),
            baseline_measure="direct read",
            note="summed over the server and all its workers",
        ),
    ]


def run(smoke: bool, worker_counts: Sequence[int] = WORKER_COUNTS) -> list[Row]:
    timing = SMOKE if smoke else FULL
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="privsep-bench-rpc-") as tmp:
        home = Home(Path(tmp))
        progress("preparing a home with the runner CLI (keys, database, credentials)")
        home.prepare()
        defined = False
        for workers in worker_counts:
            progress(f"starting runner server with {workers} workers")
            with running_server(home, workers) as server:
                api = Api(server.port)
                try:
                    if not defined:
                        define_workflow_and_variable(api, home, server.audience)
                        defined = True
                    token = task_token(api, home, server.audience)
                finally:
                    api.close()
                progress("direct SQLAlchemy read (baseline)")
                direct = direct_baseline(home, timing)
                for transport in ("tcp", "unix"):
                    progress(f"{CONCURRENCY} clients, {transport}, {workers} workers")
                    result = load(
                        server,
                        path=f"/v1/task/variables/{VARIABLE_KEY}",
                        token=token,
                        transport=transport,
                        timing=timing,
                    )
                    progress(
                        f"  {result.throughput.median:,.0f} req/s, "
                        f"p99 {result.latency_ms.p99 or 0:.1f} ms"
                    )
                    label = (
                        f"RPC GET variable (JWT + read), {CONCURRENCY} clients, "
                        f"{'TCP' if transport == 'tcp' else 'unix socket'}, {workers} workers"
                    )
                    rows += rpc_rows(label, result, direct)
                if workers == worker_counts[0]:
                    progress(f"HTTP floor: GET /v1/jwks, tcp, {workers} workers")
                    floor = load(server, path="/v1/jwks", token="", transport="tcp", timing=timing)
                    rows.append(
                        figure(
                            f"HTTP floor: GET /v1/jwks (no auth, no DB), {CONCURRENCY} clients, "
                            f"TCP, {workers} workers: throughput",
                            floor.throughput,
                            "req/s",
                            higher_is_better=True,
                            note=f"server CPU {floor.server_cpu_us:.0f} µs/request; "
                            f"p50 {floor.latency_ms.median:.2f} ms, "
                            f"p99 {floor.latency_ms.p99 or 0:.2f} ms",
                        )
                    )
    return rows
