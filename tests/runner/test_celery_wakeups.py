"""Celery as a wake-up transport, on real processes: a real redis-server, a real server that
publishes wake-ups, real supervisors that consume them as Celery workers and run real sandboxes.

A wake-up carries a queue name and item ids, nothing else; the claim still goes through the API.
So these tests check the four things that must follow: a wake-up makes a claim happen at once
(a supervisor whose poll interval is an hour still runs the work); a lost wake-up costs only
latency (the poll finds the work); a repeated one runs nothing twice; and the broker, read
directly, holds no token and no payload. Queue routing comes with it: a supervisor serving
queue ``a`` never claims a task of queue ``b``.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from stack import Stack, free_port, running_stack

from privsep._wakeups import TASK_NAME, celery_app, celery_queue

pytestmark = pytest.mark.slow

JWT = re.compile(r"eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]+")
MARKER = "conf-marker-7f3a9c"
XCOM_MARKER = "xcom-marker-51be02"

CHAIN = textwrap.dedent(f"""
    from privsep.client import Context, Workflow

    wf = Workflow("chain", schedule=None)

    @wf.task
    def first(ctx: Context) -> str:
        return "{XCOM_MARKER}"

    @wf.task(upstream=[first])
    def second(ctx: Context) -> str:
        return ctx.xcom_pull("first")

    @wf.task(upstream=[second])
    def third(ctx: Context) -> None:
        pass
""")

ROUTED = textwrap.dedent("""
    from privsep.client import Context, Workflow

    wf = Workflow("routed", schedule=None, queue="a")

    @wf.task
    def on_a(ctx: Context) -> None:
        pass

    @wf.task(queue="b")
    def on_b(ctx: Context) -> None:
        pass
""")


class RedisServer:
    """A redis-server of our own on a free port, in a temporary directory, no persistence."""

    def __init__(self, workdir: Path) -> None:
        self.dir = workdir
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        exe = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.proc = subprocess.Popen(
            [
                exe,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.dir),
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = self.client()
        deadline = time.monotonic() + 20
        while True:
            try:
                client.ping()
                return
            except redis.exceptions.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, db=0)

    def everything(self) -> list[bytes]:
        """Every value stored in every key, of every type: what a reader of the broker sees."""
        r = self.client()
        out: list[bytes] = []
        for key in r.scan_iter():
            out.append(key)
            kind = r.type(key)
            if kind == b"string":
                out.append(r.get(key) or b"")
            elif kind == b"list":
                out.extend(r.lrange(key, 0, -1))
            elif kind == b"hash":
                for field, value in r.hgetall(key).items():
                    out += [field, value]
            elif kind == b"set":
                out.extend(r.smembers(key))
            elif kind == b"zset":
                out.extend(r.zrange(key, 0, -1))
        return out


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[RedisServer]:
    if shutil.which("redis-server") is None and not Path("/usr/bin/redis-server").exists():
        pytest.fail("redis-server is not installed (apt-get install redis-server)")
    server = RedisServer(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.kill()


def celery_env(broker: RedisServer, *, poll: float, wakeups: str = "celery") -> dict[str, str]:
    return {
        "PRIVSEP__SERVER__WAKEUPS_BROKER": broker.url,
        "PRIVSEP__SUPERVISOR__WAKEUPS": wakeups,
        "PRIVSEP__SUPERVISOR__WAKEUPS_BROKER": broker.url,
        "PRIVSEP__SUPERVISOR__POLL_INTERVAL": str(poll),
    }


def wait_success(stack: Stack, run_id: str, timeout: float = 90) -> None:
    stack.wait_for(lambda: stack.run_state(run_id) == "success", timeout, f"run {run_id}")


def trigger(stack: Stack, workflow_id: str, conf: dict[str, Any] | None = None) -> str:
    resp = stack.operator(
        "POST", f"/v1/operator/workflows/{workflow_id}/runs", {"conf": conf or {}}
    )
    assert resp.status_code == 200, resp.text
    return str(resp.json()["id"])


def test_a_wakeup_claims_at_once_though_the_poll_interval_is_an_hour(
    broker: RedisServer,
) -> None:
    env = celery_env(broker, poll=3600)
    with running_stack("cw1-", uid_first=231_000, **env) as stack:
        (stack.home / "workflows" / "chain.py").write_text(CHAIN)
        stack.start("supervisor", "supervisor")
        # The first run waits for the parse (queued by discovery, claimed at start); it ends
        # with the claim that found nothing, after which the next poll is an hour away.
        wait_success(stack, stack.trigger_when_parsed("chain"))
        # Let the supervisor finish that run's last sandbox and make its last claim (which
        # finds nothing): a run triggered before it would be found by that claim.
        time.sleep(3)
        # Work that appears now reaches the supervisor only through a wake-up: without one,
        # this run would wait out the hour.
        run_id = trigger(stack, "chain")
        wait_success(stack, run_id, timeout=60)
        assert "consuming wake-ups from" in stack.output("supervisor")


def test_a_lost_wakeup_still_ends_in_success_by_polling(broker: RedisServer) -> None:
    env = celery_env(broker, poll=2)
    with running_stack("cw2-", uid_first=232_000, **env) as stack:
        (stack.home / "workflows" / "chain.py").write_text(CHAIN)
        stack.start("supervisor", "supervisor")
        wait_success(stack, stack.trigger_when_parsed("chain"))
        broker.kill()  # every wake-up published from here on is lost
        for _ in range(2):
            wait_success(stack, trigger(stack, "chain"))
        # The broker's outage is said once, however many wake-ups it lost.
        assert stack.output("server").count("cannot publish wake-ups") == 1
        broker.start()  # the broker comes back (empty: its messages were never saved)
        wait_success(stack, trigger(stack, "chain"))


def test_repeated_wakeups_run_nothing_twice(broker: RedisServer) -> None:
    env = celery_env(broker, poll=3600)
    with running_stack("cw3-", uid_first=233_000, **env) as stack:
        (stack.home / "workflows" / "chain.py").write_text(CHAIN)
        stack.start("supervisor", "supervisor")
        wait_success(stack, stack.trigger_when_parsed("chain"))
        run_id = trigger(stack, "chain")
        wait_success(stack, run_id, timeout=60)
        ids = [a["id"] for a in stack.attempts(run_id)]
        # Anyone who can write to the broker can repeat a wake-up (or forge one): each makes
        # the supervisor claim, and a claim takes only what is still queued.
        app = celery_app(broker.url, name="test")
        for _ in range(20):
            app.send_task(
                TASK_NAME, kwargs={"kind": "task", "ids": ids}, queue=celery_queue("default")
            )
        r = broker.client()
        stack.wait_for(
            lambda: r.llen(celery_queue("default")) == 0 and not r.hlen("unacked"),
            60,
            "the supervisor to take every repeated wake-up",
        )
        attempts = stack.attempts(run_id)
        assert sorted(a["task_id"] for a in attempts) == ["first", "second", "third"]
        assert {a["state"] for a in attempts} == {"success"}
        assert {a["try_number"] for a in attempts} == {1}


def _decoded(values: list[bytes]) -> str:
    """Every stored value, with the base64 bodies of Celery messages decoded too."""
    out = []
    for raw in values:
        text = raw.decode("utf-8", "replace")
        out.append(text)
        try:
            message = json.loads(text)
        except ValueError:
            continue
        if isinstance(message, list) and message and isinstance(message[0], str):
            message = json.loads(message[0])  # the unacked hash: [message, exchange, key]
        if isinstance(message, dict) and isinstance(message.get("body"), str):
            out.append(base64.b64decode(message["body"]).decode("utf-8", "replace"))
    return "\n".join(out)


def test_the_broker_holds_no_token_and_no_payload(broker: RedisServer) -> None:
    # The server publishes; the supervisor polls and consumes nothing, so every wake-up of
    # the run stays in Redis to be read.
    env = celery_env(broker, poll=0.5, wakeups="poll")
    with running_stack("cw4-", uid_first=234_000, **env) as stack:
        (stack.home / "workflows" / "chain.py").write_text(CHAIN)
        stack.start("supervisor", "supervisor")
        run_id = stack.trigger_when_parsed("chain")
        wait_success(stack, run_id)
        run_id = trigger(stack, "chain", {"password": MARKER})
        wait_success(stack, run_id)
        stored = _decoded(broker.everything())
        # The wake-ups are there, naming the attempts (so this read sees real messages)...
        for attempt in stack.attempts(run_id):
            assert attempt["id"] in stored
        assert TASK_NAME in stored
        # ...and nothing that would let a reader act: no token, no conf, no task result.
        assert not JWT.search(stored), JWT.search(stored)
        assert MARKER not in stored
        assert XCOM_MARKER not in stored


def test_a_supervisor_serving_queue_a_never_claims_a_task_of_queue_b(
    broker: RedisServer,
) -> None:
    env = celery_env(broker, poll=0.2)
    env["PRIVSEP__SUPERVISOR__QUEUES"] = "a"
    with running_stack("cw5-", uid_first=235_000, **env) as stack:
        (stack.home / "workflows" / "routed.py").write_text(ROUTED)
        stack.start("supervisor", "supervisor")
        run_id = stack.trigger_when_parsed("routed")

        def done_on_a() -> bool:
            return any(
                a["task_id"] == "on_a" and a["state"] == "success" for a in stack.attempts(run_id)
            )

        stack.wait_for(done_on_a, 90, "the task of queue a")
        # Both tasks were queued together and the supervisor had room for both: it took
        # only its own queue's.
        time.sleep(1)  # several more claims (every 0.2 s) that must not take on_b either
        states = {a["task_id"]: a["state"] for a in stack.attempts(run_id)}
        assert states == {"on_a": "success", "on_b": "queued"}

        # A supervisor that serves b runs it.
        start_node(stack, "sup-b", 235_100, {"PRIVSEP__SUPERVISOR__QUEUES": "b"})
        wait_success(stack, run_id)


def start_node(stack: Stack, name: str, uid_first: int, extra: dict[str, str]) -> None:
    """A second supervisor with a home, credential and uid range of its own."""
    home = stack.home / name
    home.mkdir(mode=0o700)
    key = home / "credentials" / "supervisor.key"
    made = stack.runner("credentials", "create", "--out", str(key))
    assert made.returncode == 0, made.stderr
    registered = stack.runner("supervisors", "register", name, "--public-key", f"{key}.pub")
    assert registered.returncode == 0, registered.stderr
    env = dict(stack.env)
    env.update(
        {
            "PRIVSEP_HOME": str(home),
            "PRIVSEP__CORE__WORKFLOWS_DIR": str(stack.home / "workflows"),
            "PRIVSEP__SUPERVISOR__NAME": name,
            "PRIVSEP__SUPERVISOR__DISCOVERY": "false",
            "PRIVSEP__SANDBOX__UID_FIRST": str(uid_first),
            **extra,
        }
    )
    out = open(stack.home / f"{name}.out", "w")  # noqa: SIM115 - closed with the process
    stack.procs[name] = subprocess.Popen(
        [sys.executable, "-m", "privsep", "supervisor"],
        env=env,
        stdout=out,
        stderr=subprocess.STDOUT,
        text=True,
    )
