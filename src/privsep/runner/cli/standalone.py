"""``runner standalone``: the whole system on one host, in one command.

The first run creates the home with correct permissions and every key it needs (token signing
ring, Fernet key, supervisor and operator credentials), migrates the SQLite database, registers
the supervisor and the operator and loads a default policy for the bundled examples. Every run
then starts the server and one supervisor as child processes — separate processes, so the
signing keys and the supervisor credential never share an address space — and stops both
cleanly on Ctrl-C.

``--once`` triggers every workflow in the folder once, waits for the runs to end, prints one
row per task and exits 0 only if every task succeeded.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import requests

from privsep.runner.cli.operator_client import OperatorClient
from privsep.runner.errors import EXIT_USAGE, CommandError
from privsep.secrets.files import InsecureFileError, make_private_dir, write_private_file

SUPERVISOR_NAME = "standalone"
OPERATOR_NAME = "standalone-operator"
PARSE_WAIT = 120.0
RUN_WAIT = 600.0
MAX_SUPERVISOR_RESTARTS = 5

# What the bundled examples need, granted on the first run (operator policy, never workflow
# code, decides what a workflow may read).
EXAMPLE_POLICY = (("etl", "variable", "etl_target"), ("etl", "connection", "warehouse"))
EXAMPLE_VARIABLES = {"etl_target": "analytics.daily_rows"}
EXAMPLE_CONNECTION = {
    "conn_type": "postgres",
    "host": "warehouse.example",
    "port": 5432,
    "login": "etl",
    "password": "example-only-password",
    "schema": "analytics",
}


def bundled_examples() -> Path:
    import privsep.examples

    return Path(privsep.examples.__file__).parent


def definition_files(folder: Path) -> list[Path]:
    """What discovery will parse (the same rule: ``*.py`` not starting with ``.`` or ``_``)."""
    out = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith((".", "__"))]
        out += [Path(root) / f for f in files if f.endswith(".py") and not f.startswith((".", "_"))]
    return sorted(out)


@dataclass
class Options:
    home: Path
    workflows: Path
    once: bool
    parallelism: int | None
    as_json: bool


def _runner(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "privsep", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _step(what: str, done: subprocess.CompletedProcess[str]) -> None:
    if done.returncode != 0:
        detail = (done.stderr or done.stdout).strip().splitlines()
        raise CommandError(
            f"standalone set-up failed at {what}: "
            f"{detail[-1] if detail else 'exit ' + str(done.returncode)}"
        )


def first_run(home: Path, env: dict[str, str], progress: Any) -> bool:
    """Create what is missing; returns True when this was the first run."""
    created = False
    make_private_dir(str(home))
    os.chmod(home, 0o700)
    config = home / "privsep.toml"
    if not config.exists():
        write_private_file(
            str(config),
            (
                b"# Written by `runner standalone` on its first run; see `runner config default`.\n"
                b'[server]\nfernet_key_file = "keys/fernet.key"\n'
            ),
        )
        created = True
    fernet = home / "keys" / "fernet.key"
    if not fernet.exists():
        from privsep.secrets.fernet import generate_fernet_key

        progress("generating the Fernet key for stored connections")
        write_private_file(str(fernet), (generate_fernet_key() + "\n").encode())
    if not (home / "keys" / "signing" / "ring.json").exists():
        progress("generating the token-signing key ring")
        _step("runner keys rotate", _runner(["keys", "rotate"], env))
    for name in ("supervisor", "operator"):
        key = home / "credentials" / f"{name}.key"
        if not key.exists():
            progress(f"generating the {name} credential")
            _step(f"creating {key}", _runner(["credentials", "create", "--out", str(key)], env))
    progress("migrating the database")
    _step("runner db upgrade", _runner(["db", "upgrade"], env))
    reg = _runner(
        [
            "supervisors",
            "register",
            SUPERVISOR_NAME,
            "--public-key",
            str(home / "credentials" / "supervisor.key.pub"),
            "--replace",
        ],
        env,
    )
    _step("registering the supervisor", reg)
    reg = _runner(
        [
            "operators",
            "register",
            OPERATOR_NAME,
            "--public-key",
            str(home / "credentials" / "operator.key.pub"),
            "--replace",
        ],
        env,
    )
    _step("registering the operator", reg)
    perms = _runner(["check-perms"], env)
    if perms.returncode != 0:
        raise CommandError("the standalone home fails check-perms:\n" + perms.stdout.strip())
    return created


def load_example_policy(op: OperatorClient) -> None:
    existing = {
        (g["workflow_pattern"], g["kind"], g["name_pattern"])
        for g in op.call("GET", "/v1/operator/policy")["grants"]
    }
    for grant in EXAMPLE_POLICY:
        if grant not in existing:
            op.call(
                "POST",
                "/v1/operator/policy",
                body={"workflow_pattern": grant[0], "kind": grant[1], "name_pattern": grant[2]},
            )
    for key, value in EXAMPLE_VARIABLES.items():
        op.call("PUT", f"/v1/operator/variables/{key}", body={"value": value})
    op.call("PUT", "/v1/operator/connections/warehouse", body=EXAMPLE_CONNECTION)


class Standalone:
    def __init__(self, opts: Options, env: dict[str, str], url: str) -> None:
        self.opts = opts
        self.env = env
        self.url = url
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.log_dir = opts.home / "state" / "standalone"
        self.restarts = 0
        # What our own server answers as its instance (the id of this home's signing key
        # ring), known once the first run has created the ring.
        self.instance: str | None = None

    def progress(self, message: str) -> None:
        if not self.opts.as_json:
            print(f"standalone: {message}", file=sys.stderr, flush=True)

    def start(self, name: str) -> None:
        make_private_dir(str(self.log_dir))
        log = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - kept with the process
        os.chmod(self.log_dir / f"{name}.log", 0o600)
        self.procs[name] = subprocess.Popen(
            [sys.executable, "-m", "privsep", name],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def check_alive(self) -> None:
        """A dead server ends standalone; a dead supervisor is restarted (a few times), and
        its restart hands back whatever it was running, so those attempts are rescheduled."""
        for name, proc in list(self.procs.items()):
            if proc.poll() is None:
                continue
            log_path = self.log_dir / f"{name}.log"
            lines = [ln for ln in log_path.read_text(errors="replace").splitlines() if ln][-5:]
            if name == "supervisor" and self.restarts < MAX_SUPERVISOR_RESTARTS:
                self.restarts += 1
                self.progress(
                    f"the supervisor exited with status {proc.returncode}; "
                    f"restarting it ({self.restarts}/{MAX_SUPERVISOR_RESTARTS})"
                )
                self.start("supervisor")
                continue
            raise CommandError(
                f"the {name} exited with status {proc.returncode}:\n  " + "\n  ".join(lines)
            )

    def check_port_free(self) -> None:
        """Before starting our server: whoever already answers on its port is someone else."""
        port = urlsplit(self.url).port or 80
        with socket.socket() as probe:
            probe.settimeout(1.0)
            if probe.connect_ex((urlsplit(self.url).hostname or "127.0.0.1", port)) != 0:
                return  # nothing listens there: the port is ours to take
        self.refuse_port(self.instance_at_url())

    def instance_at_url(self) -> str | None:
        """The instance id that ``/v1/health`` at our URL answers, or None for something that
        is not a privsep server (or does not answer like one)."""
        try:
            body = requests.get(self.url + "/v1/health", timeout=2).json()
        except (requests.RequestException, ValueError):
            return None
        instance = body.get("instance") if isinstance(body, dict) else None
        return instance if isinstance(instance, str) else None

    def refuse_port(self, instance: str | None) -> None:
        """One line: the port, who holds it, and the settings that move standalone elsewhere."""
        port = urlsplit(self.url).port or 80
        if instance is None:
            who = "something that is not a privsep server"
        elif instance == self.instance:
            who = "a privsep server of this same home (is another `runner standalone` running?)"
        else:
            who = f"another privsep deployment (instance {instance})"
        raise CommandError(
            f"port {port} ({self.url}) is already served by {who}; choose another port with "
            "server.bind and server.url (e.g. PRIVSEP__SERVER__BIND=127.0.0.1:8781 "
            "PRIVSEP__SERVER__URL=http://127.0.0.1:8781)"
        )

    def wait_for_server(self, timeout: float = 60.0) -> None:
        """Until our own server answers: a 200 from another instance is not readiness."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            with contextlib.suppress(requests.RequestException):
                if requests.get(self.url + "/v1/health", timeout=1).status_code == 200:
                    instance = self.instance_at_url()
                    if instance != self.instance:
                        self.refuse_port(instance)
                    return
            time.sleep(0.1)
        raise CommandError(f"the server did not answer on {self.url} within {timeout:.0f} s")

    def stop(self) -> None:
        """The supervisor first (it drains and reports), then the server."""
        for name in ("supervisor", "server"):
            proc = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def watch(self, op: OperatorClient) -> None:
        """Live progress on a terminal: the latest runs and their tasks, until Ctrl-C."""
        from rich.live import Live

        with Live(self.progress_table(op), refresh_per_second=2, transient=False) as live:
            while True:
                self.check_alive()
                time.sleep(1.0)
                live.update(self.progress_table(op))

    def progress_table(self, op: OperatorClient) -> Any:
        from rich.table import Table

        table = Table(title=f"privsep standalone on {self.url} (Ctrl-C stops)")
        for column in ("run", "workflow", "state", "tasks"):
            table.add_column(column)
        try:
            runs = op.call("GET", "/v1/operator/runs", params={"limit": 10})["runs"]
            for run in runs:
                attempts = op.call("GET", f"/v1/operator/runs/{run['id']}/attempts")["attempts"]
                counts: dict[str, int] = {}
                for a in attempts:
                    counts[a["state"]] = counts.get(a["state"], 0) + 1
                tasks = ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
                table.add_row(run["id"][:8], run["workflow_id"], run["state"], tasks or "-")
        except CommandError as exc:
            table.add_row("-", "-", f"server unreachable: {exc}", "")
        return table

    # --- --once -------------------------------------------------------------------------------

    def wait_for_parses(self, op: OperatorClient, files: list[Path]) -> list[str]:
        """Every file either defines workflows or has a parse error; returns workflow ids."""
        wanted = {f.resolve().as_uri() for f in files}
        deadline = time.monotonic() + PARSE_WAIT
        while True:
            self.check_alive()
            workflows = op.call("GET", "/v1/operator/workflows")["workflows"]
            errors = op.call("GET", "/v1/operator/parse-errors")["errors"]
            parsed = {w["source_uri"] for w in workflows if w["active"]}
            failed = {e["file_path"] for e in errors}
            if wanted <= parsed | failed:
                for e in errors:
                    if e["file_path"] in wanted:
                        first = e["message"].strip().splitlines()[-1:] or [""]
                        self.progress(f"parse error in {e['file_path']}: {first[0]}")
                return sorted(
                    w["id"] for w in workflows if w["active"] and w["source_uri"] in wanted
                )
            if time.monotonic() > deadline:
                missing = sorted(wanted - parsed - failed)
                raise CommandError(
                    f"definition files not parsed within {PARSE_WAIT:.0f} s: {', '.join(missing)}"
                )
            time.sleep(0.2)

    def run_once(self, op: OperatorClient) -> int:
        files = definition_files(self.opts.workflows)
        ids = self.wait_for_parses(op, files)
        if not ids:
            raise CommandError(
                f"{self.opts.workflows} holds no workflow that parses (see the parse errors above)",
                EXIT_USAGE,
            )
        runs = {}
        for workflow_id in ids:
            runs[workflow_id] = op.call(
                "POST", f"/v1/operator/workflows/{workflow_id}/runs", body={"conf": {}}
            )["id"]
            self.progress(f"triggered {workflow_id} (run {runs[workflow_id][:8]})")
        deadline = time.monotonic() + RUN_WAIT
        pending = dict(runs)
        while pending:
            self.check_alive()
            for workflow_id, run_id in list(pending.items()):
                state = op.call("GET", f"/v1/operator/runs/{run_id}")["state"]
                if state in ("success", "failed"):
                    self.progress(f"{workflow_id}: {state}")
                    del pending[workflow_id]
            if time.monotonic() > deadline:
                raise CommandError(
                    f"runs did not finish within {RUN_WAIT:.0f} s: {', '.join(sorted(pending))}"
                )
            time.sleep(0.2)
        rows = self.summary(op, runs)
        self.print_summary(rows)
        return 0 if rows and all(r["state"] == "success" for r in rows) else 1

    def summary(self, op: OperatorClient, runs: dict[str, str]) -> list[dict[str, Any]]:
        rows = []
        for workflow_id, run_id in runs.items():
            attempts = op.call("GET", f"/v1/operator/runs/{run_id}/attempts")["attempts"]
            by_task: dict[str, list[dict[str, Any]]] = {}
            for a in attempts:
                by_task.setdefault(a["task_id"], []).append(a)
            for task_id, tries in sorted(by_task.items()):
                last = max(tries, key=lambda a: a["try_number"])
                rows.append(
                    {
                        "workflow": workflow_id,
                        "run": run_id,
                        "task": task_id,
                        "state": last["state"],
                        "tries": last["try_number"],
                        "duration_s": _duration(tries),
                        "error": last.get("error"),
                    }
                )
        return rows

    def print_summary(self, rows: list[dict[str, Any]]) -> None:
        if self.opts.as_json:
            ok = all(r["state"] == "success" for r in rows)
            print(json.dumps({"ok": ok, "tasks": rows}, indent=2))
            return
        from rich.console import Console
        from rich.table import Table

        table = Table(title="privsep standalone --once")
        for column in ("workflow", "task", "state", "tries", "duration"):
            table.add_column(column)
        for r in rows:
            style = "green" if r["state"] == "success" else "red"
            duration = f"{r['duration_s']:.2f} s" if r["duration_s"] is not None else "-"
            table.add_row(
                r["workflow"],
                r["task"],
                f"[{style}]{r['state']}[/{style}]",
                str(r["tries"]),
                duration,
            )
        Console().print(table)


def _duration(tries: list[dict[str, Any]]) -> float | None:
    from datetime import datetime

    starts = [t["started_at"] for t in tries if t.get("started_at")]
    ends = [t["ended_at"] for t in tries if t.get("ended_at")]
    if not starts or not ends:
        return None
    return (datetime.fromisoformat(max(ends)) - datetime.fromisoformat(min(starts))).total_seconds()


def run_standalone(opts: Options, base_env: dict[str, str] | None = None) -> int:
    if not opts.workflows.is_dir():
        raise CommandError(
            f"workflows folder {opts.workflows} does not exist "
            "(pass --workflows DIR, or omit it for the bundled examples)",
            EXIT_USAGE,
        )
    files = definition_files(opts.workflows)
    if not files:
        raise CommandError(f"{opts.workflows} holds no workflow definition file (*.py)", EXIT_USAGE)
    env = {
        k: v
        for k, v in (base_env or os.environ).items()
        if not k.startswith(("PRIVSEP_HOME", "PRIVSEP_CONFIG"))
    }
    env["PRIVSEP_HOME"] = str(opts.home)
    env["PRIVSEP__CORE__WORKFLOWS_DIR"] = str(opts.workflows.resolve())
    env["PRIVSEP__SUPERVISOR__NAME"] = SUPERVISOR_NAME
    if opts.parallelism:
        env["PRIVSEP__SUPERVISOR__PARALLELISM"] = str(opts.parallelism)
        env["PRIVSEP__SUPERVISOR__EXECUTOR"] = "local"
    from privsep.runner.config.loader import load_config

    cfg = load_config(environ=env)
    url = str(cfg.get("server.url"))
    if not str(cfg.get("supervisor.api_socket")):
        # Both run here: the supervisor talks to the API over its unix socket (cheaper than
        # loopback TCP for both sides), unless the configuration says otherwise.
        env["PRIVSEP__SUPERVISOR__API_SOCKET"] = str(cfg.path_of("server.socket"))
    app = Standalone(opts, env, url)
    from privsep.runner.config.endpoints import endpoints

    op = OperatorClient(
        url, str(opts.home / "credentials" / "operator.key"), audience=endpoints(cfg).audience
    )
    # SIGTERM (kill, systemd, a container runtime) and SIGHUP (a closed terminal) mean what
    # Ctrl-C means: stop what we started. Left at their defaults they would end this process
    # alone and leave the server, the supervisor and its sandboxes running under PID 1.
    # SIGINT is claimed too: a shell starts a background job (`runner standalone &`, nohup,
    # a CI script) with SIGINT ignored, and Python then leaves it ignored, so `kill -INT`
    # would do nothing at all.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.default_int_handler)
    try:
        created = first_run(opts.home, env, app.progress)
    except (OSError, InsecureFileError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise CommandError(
            f"cannot use {opts.home} as the privsep home: {reason} "
            "(choose another with --home or PRIVSEP_HOME)",
            EXIT_USAGE,
        ) from None
    except KeyboardInterrupt:
        app.progress("stopping")
        app.stop()
        return 0
    if created:
        app.progress(f"created {opts.home}")
    app.progress(f"home {opts.home}, workflows {opts.workflows}")
    from privsep.secrets.keyring import ring_id

    app.instance = ring_id(cfg.path_of("server.signing_keyring"))
    try:
        app.check_port_free()
        app.start("server")
        app.wait_for_server()
        if opts.workflows.resolve() == bundled_examples().resolve():
            load_example_policy(op)
        app.start("supervisor")
        if opts.once:
            return app.run_once(op)
        app.progress(f"serving on {url}; Ctrl-C stops")
        if sys.stdout.isatty() and not opts.as_json:
            app.watch(op)
        while True:
            app.check_alive()
            time.sleep(0.5)
    except KeyboardInterrupt:
        app.progress("stopping")
        return 0
    finally:
        app.stop()
        op.close()
