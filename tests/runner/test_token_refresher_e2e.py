"""``runner token-refresher`` beside a supervisor that holds no key: real processes, real uids.

The stack's server runs with 10 s session tokens. The refresher runs as its own uid, the only
one that can read the supervisor's key (0600, its own); the supervisor runs as root with
``supervisor.session_token_file`` and a ``supervisor.credential`` it could not even resolve
(``systemd:`` outside any unit), and its own home holds no key at all. A workflow whose first
task outlasts several token lifetimes must still succeed through the token file, across a
``kill -9`` and restart of the refresher, and afterwards neither the supervisor's memory nor
its open files hold any form of the key, while the same scan finds it in the refresher.
"""

from __future__ import annotations

import base64
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from other_uid import as_user
from stack import Stack, free_port, running_stack

from helpers import readable_memory

REFRESHER_UID = 150_900
REFRESHER_GID = 150_901
TOKEN_GID = 150_902  # the group the token file is shared with
SESSION_TTL = 10

LONG_CHAIN = textwrap.dedent("""
    import time
    from privsep.client import Context, Workflow

    wf = Workflow("longchain", schedule=None)

    @wf.task
    def slow(ctx: Context) -> int:
        time.sleep(35)  # several session-token lifetimes
        return 1

    @wf.task(upstream=[slow])
    def after(ctx: Context) -> int:
        return ctx.xcom_pull("slow") + 1
""")


class Refresher:
    """``runner token-refresher`` as its own uid, with its own home and the only key copy."""

    def __init__(self, stack: Stack, token_dir: Path) -> None:
        self.home = Path(tempfile.mkdtemp(prefix="trf-", dir="/tmp"))
        (self.home / "credentials").mkdir()
        self.key = self.home / "credentials" / "supervisor.key"
        shutil.move(stack.home / "credentials" / "supervisor.key", self.key)
        for path in (self.home, self.home / "credentials", self.key):
            os.chown(path, REFRESHER_UID, REFRESHER_GID)
        self.home.chmod(0o700)
        (self.home / "credentials").chmod(0o700)
        self.key.chmod(0o600)
        self.token_file = token_dir / "session"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("PRIVSEP")}
        self.env.update(
            {
                "PRIVSEP_HOME": str(self.home),
                "PRIVSEP__SERVER__URL": stack.url,
                "PRIVSEP__SUPERVISOR__NAME": "sup-test",
                "PRIVSEP__SUPERVISOR__CREDENTIAL": str(self.key),
                "PRIVSEP__TOKEN_REFRESHER__TOKEN_FILE": str(self.token_file),
                "PRIVSEP__TOKEN_REFRESHER__GROUP": str(TOKEN_GID),
            }
        )
        self.runs = 0
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> subprocess.Popen[str]:
        self.runs += 1
        log = open(self.home.parent / f"{self.home.name}-{self.runs}.out", "w")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "privsep", "token-refresher"],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
            preexec_fn=as_user(REFRESHER_UID, REFRESHER_GID, [TOKEN_GID]),
            cwd="/",
        )
        return self.proc

    def output(self) -> str:
        return "".join(
            (self.home.parent / f"{self.home.name}-{n}.out").read_text()
            for n in range(1, self.runs + 1)
        )

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)

    def remove(self) -> None:
        self.stop()
        for n in range(1, self.runs + 1):
            (self.home.parent / f"{self.home.name}-{n}.out").unlink(missing_ok=True)
        shutil.rmtree(self.home, ignore_errors=True)


@pytest.fixture
def sidecar() -> Iterator[tuple[Stack, Refresher]]:
    # The token directory as systemd's RuntimeDirectory= makes it: the refresher's, 0750, in
    # the supervisor's group, below a root-owned directory.
    shared = Path(tempfile.mkdtemp(prefix="trt-", dir="/tmp"))
    shared.chmod(0o755)
    token_dir = shared / "token"
    token_dir.mkdir(mode=0o750)
    os.chown(token_dir, REFRESHER_UID, TOKEN_GID)
    with running_stack(
        "tr-",
        uid_first=150_000,
        PRIVSEP__SERVER__SESSION_TOKEN_TTL=str(SESSION_TTL),
        PRIVSEP__SUPERVISOR__SESSION_TOKEN_FILE=str(token_dir / "session"),
        # Not resolvable outside a systemd unit: a supervisor that looked at it would stop.
        PRIVSEP__SUPERVISOR__CREDENTIAL="systemd:supervisor.key",
    ) as stack:
        (stack.home / "workflows" / "longchain.py").write_text(LONG_CHAIN)
        refresher = Refresher(stack, token_dir)
        try:
            yield stack, refresher
        finally:
            refresher.remove()
            shutil.rmtree(shared, ignore_errors=True)


def _descendants(pid: int) -> list[int]:
    """``pid`` and every process below it."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat_line = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat_line[stat_line.rfind(")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo += children.get(current, [])
    return found


def _memory_holds(pid: int, needles: dict[str, bytes]) -> set[str]:
    """Which of ``needles`` appear anywhere in the readable memory of process ``pid``."""
    hits: set[str] = set()
    try:
        for data in readable_memory(pid):
            hits.update(name for name, needle in needles.items() if needle in data)
    except OSError:
        pass  # it ended meanwhile
    return hits


def _key_forms(key_path: Path) -> dict[str, bytes]:
    """The private key as it could sit in memory: raw bytes, PEM text, base64 of each."""
    pem = key_path.read_bytes()
    raw = serialization.load_pem_private_key(pem, password=None).private_bytes(
        serialization.Encoding.Raw,
        serialization.PrivateFormat.Raw,
        serialization.NoEncryption(),
    )
    body = b"".join(line for line in pem.splitlines() if not line.startswith(b"-----"))
    return {
        "raw": raw,
        "pem": pem.strip(),
        "pem-base64-body": body,
        "raw-base64": base64.b64encode(raw).rstrip(b"="),
        "raw-hex": raw.hex().encode(),
    }


def test_a_supervisor_without_a_key_runs_work_through_the_refreshers_token(
    sidecar: tuple[Stack, Refresher],
) -> None:
    stack, refresher = sidecar
    # The supervisor first: with no token yet it waits for one rather than dying.
    supervisor = stack.start("supervisor", "supervisor")
    stack.wait_for(
        lambda: "no session token in" in stack.output("supervisor"), 30, "the supervisor to wait"
    )
    assert supervisor.poll() is None
    # Type=notify: READY=1 once the first token is written.
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify_path = refresher.token_file.parent.parent / "notify"
    notify.bind(str(notify_path))
    notify_path.chmod(0o666)
    notify.settimeout(30)
    refresher.env["NOTIFY_SOCKET"] = str(notify_path)
    refresher.start()
    messages = []
    while b"READY=1" not in b"".join(messages):
        messages.append(notify.recv(4096))
    assert refresher.token_file.exists()
    notify.close()

    st = refresher.token_file.stat()
    assert stat.S_IMODE(st.st_mode) == 0o640
    assert (st.st_uid, st.st_gid) == (REFRESHER_UID, TOKEN_GID)

    run_id = stack.trigger_when_parsed("longchain")
    stack.wait_for(
        lambda: any(a["task_id"] == "slow" for a in stack.attempts(run_id)), 60, "slow to start"
    )
    time.sleep(SESSION_TTL)  # one token lifetime into the work: now the refresher dies
    assert refresher.proc is not None
    refresher.proc.send_signal(signal.SIGKILL)
    refresher.proc.wait(timeout=10)
    time.sleep(2)
    refresher.start()

    stack.wait_for(lambda: stack.run_state(run_id) in ("success", "failed"), 120, "the run")
    assert stack.run_state(run_id) == "success", stack.attempts(run_id)
    assert supervisor.poll() is None, stack.output("supervisor")
    assert refresher.output().count("session token written to") >= 6  # several lifetimes
    assert "Traceback" not in stack.output("supervisor") + refresher.output()

    # No key material in the supervisor or anything it started; the scan itself works, as
    # it finds the key in the refresher that holds it.
    forms = _key_forms(refresher.key)
    token = refresher.token_file.read_text()
    assert refresher.proc is not None and _memory_holds(refresher.proc.pid, forms)
    for pid in _descendants(supervisor.pid):
        assert _memory_holds(pid, forms) == set(), pid
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            assert str(refresher.home) not in target, (pid, target)
    # Nothing of the token in either process's output.
    assert token.split('"')[3] not in stack.output("supervisor") + refresher.output()
    health = stack.runner("health", "--token-refresher")  # the supervisor's configuration
    assert health.returncode == 0, health.stdout + health.stderr
    assert health.stdout.startswith("ok: session token valid for")
    assert stack.stop("supervisor") == 0
    refresher.proc.send_signal(signal.SIGTERM)
    assert refresher.proc.wait(timeout=10) == 0


def _refresher_alone(
    home: Path, *extra: tuple[str, str], user: int | None = None
) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PRIVSEP")}
    env.update({"PRIVSEP_HOME": str(home), **dict(extra)})
    return subprocess.Popen(
        [sys.executable, "-m", "privsep", "token-refresher"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=as_user(user, user) if user is not None else None,
        cwd="/",
    )


@pytest.fixture
def home() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="trx-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _one_line_failure(proc: subprocess.Popen[str], code: int) -> str:
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == code, out
    assert "Traceback" not in out
    assert len(out.strip().splitlines()) == 1, out
    return out


def test_a_missing_key_is_one_line_and_exit_1(home: Path) -> None:
    proc = _refresher_alone(
        home,
        ("PRIVSEP__SUPERVISOR__CREDENTIAL", str(home / "nothing.key")),
        ("PRIVSEP__TOKEN_REFRESHER__TOKEN_FILE", str(home / "session")),
    )
    out = _one_line_failure(proc, 1)
    assert f"no supervisor credential at {home / 'nothing.key'}" in out


def test_a_key_the_refresher_cannot_read_is_one_line_and_exit_1(home: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "privsep", "credentials", "create", "--out", str(home / "k.key")],
        capture_output=True,
        check=True,
    )
    assert done.returncode == 0
    (home / "k.key").chmod(0o600)  # root's: the refresher's uid cannot open it
    proc = _refresher_alone(
        home,
        ("PRIVSEP__SUPERVISOR__CREDENTIAL", str(home / "k.key")),
        ("PRIVSEP__TOKEN_REFRESHER__TOKEN_FILE", str(home / "session")),
        user=REFRESHER_UID,
    )
    out = _one_line_failure(proc, 1)
    assert "cannot read the supervisor credential" in out and "Permission denied" in out


def test_a_bad_configuration_is_one_line_and_exit_2(home: Path) -> None:
    out = _one_line_failure(_refresher_alone(home, ("PRIVSEP__TOKEN_REFRESHER__MODE", "x")), 2)
    assert "token_refresher.mode" in out
    out = _one_line_failure(_refresher_alone(home), 2)
    assert "supervisor.session_token_file are both empty" in out
    out = _one_line_failure(
        _refresher_alone(
            home,
            ("PRIVSEP__TOKEN_REFRESHER__MODE", "kerberos"),
            ("PRIVSEP__TOKEN_REFRESHER__PRINCIPAL", "x@Y"),
        ),
        2,
    )
    assert "token_refresher.keytab is empty" in out


def test_a_server_down_at_start_is_retried_with_one_line_per_attempt(home: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "privsep", "credentials", "create", "--out", str(home / "k.key")],
        capture_output=True,
        check=True,
    )
    assert done.returncode == 0
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    proc = _refresher_alone(
        home,
        ("PRIVSEP__SERVER__URL", url),
        ("PRIVSEP__SUPERVISOR__CREDENTIAL", str(home / "k.key")),
        ("PRIVSEP__TOKEN_REFRESHER__TOKEN_FILE", str(home / "session")),
    )
    time.sleep(5)
    assert proc.poll() is None  # still trying
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=10)  # SIGTERM ends the backoff's wait at once
    assert proc.returncode == 0, out
    attempts = [line for line in out.splitlines() if "cannot open a session with" in line]
    assert len(attempts) >= 2, out
    assert all("retrying in" in line for line in attempts)
    assert "Traceback" not in out
    assert len(out.strip().splitlines()) == len(attempts), out
    assert not (home / "session").exists()
