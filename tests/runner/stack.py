"""A whole privsep installation in a temporary home: real server, real supervisor, real sandboxes.

Everything is started through the ``runner`` CLI, as an operator would, and talked to over
HTTP. The operator side (triggering runs, reading attempts) uses the operator credential that
``runner credentials create`` wrote, through the real operator endpoints.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import requests

from privsep.secrets.keys import load_private_key
from privsep.secrets.tokens import create_assertion


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def short_home(prefix: str) -> Path:
    """A fresh private home under /tmp. A unix socket address holds at most 107 bytes, and
    pytest's tmp_path is long enough to push the per-sandbox socket paths past it."""
    home = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    home.chmod(0o700)
    return home


@contextlib.contextmanager
def running_stack(prefix: str, *, uid_first: int, **env: str) -> Iterator[Stack]:
    """A set-up stack in a :func:`short_home`, its server running; everything is stopped
    and removed afterwards."""
    stack = Stack(short_home(prefix), uid_first=uid_first, **env)
    stack.setup()
    stack.start_server()
    try:
        yield stack
    finally:
        stack.stop_all()
        shutil.rmtree(stack.home, ignore_errors=True)


class Stack:
    def __init__(self, home: Path, *, uid_first: int, **env: str) -> None:
        self.home = home
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("PRIVSEP")}
        self.env.update(
            {
                "PRIVSEP_HOME": str(home),
                "PRIVSEP__SERVER__BIND": f"127.0.0.1:{self.port}",
                "PRIVSEP__SERVER__URL": self.url,
                "PRIVSEP__SANDBOX__UID_FIRST": str(uid_first),
                "PRIVSEP__SANDBOX__UID_COUNT": "50",
                "PRIVSEP__SUPERVISOR__NAME": "sup-test",
                "PRIVSEP__SUPERVISOR__DISCOVERY_INTERVAL": "0.3",
                "PRIVSEP__SUPERVISOR__HEARTBEAT_INTERVAL": "1",
                "PRIVSEP__SUPERVISOR__PARALLELISM": "2",
            }
        )
        self.env.update(env)
        self.procs: dict[str, subprocess.Popen[str]] = {}
        self._operator_token = ""

    def runner(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "privsep", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def setup(self) -> None:
        (self.home / "workflows").mkdir(parents=True, exist_ok=True)
        os.chmod(self.home, 0o700)
        for args in (
            ("keys", "rotate"),
            ("db", "upgrade"),
            ("credentials", "create", "--out", str(self.home / "credentials/supervisor.key")),
            ("credentials", "create", "--out", str(self.home / "credentials/operator.key")),
            (
                "supervisors",
                "register",
                "sup-test",
                "--public-key",
                str(self.home / "credentials/supervisor.key.pub"),
            ),
        ):
            done = self.runner(*args)
            assert done.returncode == 0, (args, done.stderr)

    def start(self, name: str, *args: str) -> subprocess.Popen[str]:
        log = open(self.home / f"{name}.out", "w")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(
            [sys.executable, "-m", "privsep", *args],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.procs[name] = proc
        return proc

    def output(self, name: str) -> str:
        path = self.home / f"{name}.out"
        return path.read_text() if path.exists() else ""

    def retire(self, name: str, new_name: str) -> None:
        """Keep a dead process (and its output) under another name, e.g. after a SIGKILL."""
        self.procs[new_name] = self.procs.pop(name)
        (self.home / f"{name}.out").rename(self.home / f"{new_name}.out")

    def start_server(self) -> None:
        self.start("server", "server")
        self.wait_for(lambda: self._health_ok(), 30, "server to answer /v1/health")

    def _health_ok(self) -> bool:
        try:
            return requests.get(self.url + "/v1/health", timeout=1).status_code == 200
        except requests.RequestException:
            return False

    def stop(self, name: str, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        proc = self.procs[name]
        if proc.poll() is None:
            proc.send_signal(sig)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            # Say where it is stuck before the caller kills it: its threads' stacks (py-spy,
            # when installed) and the end of its output.
            raise AssertionError(
                f"{name} did not exit within {timeout} s of signal {sig}\n"
                f"{_thread_stacks(proc.pid)}\n--- {name}\n{self.output(name)[-4000:]}"
            ) from None

    def stop_all(self) -> None:
        for name in reversed(list(self.procs)):  # the supervisor before the server
            try:
                self.stop(name, timeout=30)
            except AssertionError:
                self.procs[name].kill()
                self.procs[name].wait()

    def wait_for(self, predicate: Any, timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            for name, proc in self.procs.items():
                if proc.poll() is not None and name != "supervisor-crashed":
                    raise AssertionError(
                        f"{name} exited ({proc.returncode}) while waiting for "
                        f"{what}:\n{self.output(name)[-4000:]}"
                    )
            time.sleep(0.1)
        logs = "\n".join(f"--- {n}\n{self.output(n)[-3000:]}" for n in self.procs)
        raise AssertionError(f"timed out after {timeout} s waiting for {what}\n{logs}")

    # --- the operator ------------------------------------------------------------------------

    def operator(self, method: str, path: str, body: Any = None) -> requests.Response:
        resp = self._as_operator(method, path, body)
        if resp.status_code == 401:  # the session ran out (short session_token_ttl): a new one
            self._operator_token = ""
            resp = self._as_operator(method, path, body)
        return resp

    def _as_operator(self, method: str, path: str, body: Any = None) -> requests.Response:
        if not self._operator_token:
            key = load_private_key(str(self.home / "credentials/operator.key"))
            # The service's name when it has one (replicas), else its one URL, as the server.
            audience = self.env.get("PRIVSEP__SERVER__AUDIENCE") or self.url
            assertion = create_assertion(key, supervisor_name="operator", audience=audience)
            resp = requests.post(
                self.url + "/v1/operator/session", json={"assertion": assertion}, timeout=10
            )
            assert resp.status_code == 200, resp.text
            self._operator_token = resp.json()["token"]
        return requests.request(
            method,
            self.url + path,
            json=body,
            timeout=10,
            headers={"Authorization": f"Bearer {self._operator_token}"},
        )

    def trigger_when_parsed(self, workflow_id: str, timeout: float = 60) -> str:
        def attempt() -> str | None:
            resp = self.operator("POST", f"/v1/operator/workflows/{workflow_id}/runs", {"conf": {}})
            return str(resp.json()["id"]) if resp.status_code == 200 else None

        return str(self.wait_for(attempt, timeout, f"workflow {workflow_id} to be parsed"))

    def run_state(self, run_id: str) -> str:
        for run in self.operator("GET", "/v1/operator/runs").json()["runs"]:
            if run["id"] == run_id:
                return str(run["state"])
        return ""

    def attempts(self, run_id: str) -> list[dict[str, Any]]:
        resp = self.operator("GET", f"/v1/operator/runs/{run_id}/attempts")
        return list(resp.json()["attempts"])


def _thread_stacks(pid: int) -> str:
    """``py-spy dump`` of a live process, or why there is none."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    try:
        done = subprocess.run(
            [spy, "dump", "--pid", str(pid)], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return f"(no thread stacks: {exc})"
    return done.stdout or done.stderr
