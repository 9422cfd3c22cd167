"""The units under a real systemd: systemd 252 as PID 1 in a container, the project and the
units installed as ``docs/deployment.md`` says, and the lifecycle an operator relies on.

The image comes from ``packaging/systemd/build-image`` (``scripts/test`` builds it; it is
cached by the digest of its inputs). It holds Debian bookworm with systemd, dbus and python3,
and a virtual environment with privsep's third-party dependencies; the tree under test is
copied in and installed into that environment offline at every run, so the test always runs
this checkout's code and units.

systemd boots with the flags in :data:`DOCKER_RUN` (``--privileged`` does not work on every
host; without ``mount --make-rshared /`` the credential mounts never reach the service and
``LoadCredential=`` silently delivers nothing), plus ``seccomp=unconfined``: Docker's own
filter refuses ``pivot_root``, which a sandbox needs. The container has no network but
loopback.

One container serves the whole module. Every test starts from both services running and
leaves them so, and ends by checking that the journal holds no Python traceback.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import tarfile
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "packaging" / "systemd" / "build-image"
VENV = "/opt/privsep/venv"
RUNNER = f"{VENV}/bin/runner"
SUPERVISOR = "privsep-supervisor.service"
SERVER = "privsep-server.service"
CREDENTIAL = f"/run/credentials/{SUPERVISOR}/supervisor.key"
# The test's own drop-in: a short watchdog and drain so the module runs in a few minutes.
WATCHDOG_SEC = 4
DRAIN_GRACE = 60

DOCKER_RUN = (
    "--cap-add",
    "SYS_ADMIN",
    "--cap-add",
    "SYS_PTRACE",
    "--cap-add",
    "NET_ADMIN",
    "--cgroupns=private",
    "--tmpfs",
    "/run",
    "--tmpfs",
    "/run/lock",
    "--stop-signal",
    "SIGRTMIN+3",
    "--network",
    "none",
    # Docker's default seccomp profile never allows pivot_root, which every process-backend
    # sandbox needs; the unit's own SystemCallFilter= (what this test is about) still applies.
    "--security-opt",
    "seccomp=unconfined",
)
BOOT = "mount --make-rshared / && exec /lib/systemd/systemd"

# What a sandbox can see of the supervisor's credential: it prints each finding, and fails
# if it can read the credential or sees a systemd variable.
PROBE = textwrap.dedent("""
    import os
    import time
    from privsep.client import Context, Workflow

    CREDENTIAL = "/run/credentials/privsep-supervisor.service/supervisor.key"
    FORBIDDEN = ("CREDENTIALS_DIRECTORY", "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")

    wf = Workflow("probe")

    @wf.task
    def look(ctx: Context) -> str:
        leaked = [name for name in FORBIDDEN if name in os.environ]
        print("probe: systemd variables seen:", leaked, flush=True)
        try:
            with open(CREDENTIAL, "rb") as fh:
                fh.read()
        except OSError as exc:
            print("probe: credential not readable:", type(exc).__name__, flush=True)
        else:
            raise RuntimeError("the supervisor's credential is readable in a sandbox")
        if leaked:
            raise RuntimeError(f"systemd variables reached the sandbox: {leaked}")
        return "nothing to see"

    nap = Workflow("nap")

    @nap.task
    def sleep(ctx: Context) -> str:
        print("napping", flush=True)
        time.sleep(8)
        print("woke up", flush=True)
        return "rested"
""")

SETUP = textwrap.dedent(f"""
    set -eu
    cd /opt/privsep/src
    # docs/deployment.md step 2 (the environment exists; install this tree into it).
    {VENV}/bin/python -m pip install --quiet --no-index --no-deps --no-build-isolation \\
        --disable-pip-version-check --no-cache-dir . >/tmp/pip.log 2>&1 || {{
        cat /tmp/pip.log; exit 1; }}
    chmod 0755 /opt/privsep /opt/privsep/venv
    # Step 3: documentation, units, user and directories.
    install -d /usr/share/doc/privsep
    install -m 0644 README.md docs/*.md /usr/share/doc/privsep/
    install -m 0644 packaging/systemd/privsep-server.service \\
        packaging/systemd/privsep-supervisor.service packaging/systemd/privsep.target \\
        /etc/systemd/system/
    install -m 0644 packaging/systemd/privsep.sysusers /usr/lib/sysusers.d/privsep.conf
    install -m 0644 packaging/systemd/privsep.tmpfiles /usr/lib/tmpfiles.d/privsep.conf
    systemd-sysusers /usr/lib/sysusers.d/privsep.conf
    systemd-tmpfiles --create /usr/lib/tmpfiles.d/privsep.conf
    srv() {{
        runuser -u privsep -- env PRIVSEP_CONFIG=/etc/privsep/server.toml \\
            PRIVSEP_HOME=/var/lib/privsep-server \\
            PRIVSEP__CORE__STATE_DIR=/var/lib/privsep-server/state {RUNNER} "$@"
    }}
    # Steps 5 and 6 (SQLite in the state directory instead of PostgreSQL).
    (umask 077; {VENV}/bin/python -c \\
        'from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())' \\
        > /etc/privsep/fernet.key)
    chown privsep:privsep /etc/privsep/fernet.key
    chmod 0400 /etc/privsep/fernet.key
    cat > /etc/privsep/server.toml <<'TOML'
    [server]
    bind = "127.0.0.1:8780"
    url = "http://127.0.0.1:8780"
    fernet_key_file = "/etc/privsep/fernet.key"
    operator_public_key = "/etc/privsep/operator.key.pub"
    TOML
    chmod 0644 /etc/privsep/server.toml
    srv keys rotate
    srv db upgrade
    srv check-perms >/dev/null
    # Step 7: the operator credential (root's, on this host).
    {RUNNER} credentials create --out /root/.privsep/credentials/operator.key >/dev/null
    install -m 0644 /root/.privsep/credentials/operator.key.pub /etc/privsep/operator.key.pub
    printf '[server]\\nurl = "http://127.0.0.1:8780"\\n' > /root/.privsep/privsep.toml
    # Step 8: the supervisor credential.
    {RUNNER} credentials create --out /etc/privsep/supervisor.key >/dev/null
    chmod 0400 /etc/privsep/supervisor.key
    srv supervisors register node-1 --public-key /etc/privsep/supervisor.key.pub
    # Step 9: the supervisor's configuration and a workflow.
    cat > /etc/privsep/supervisor.toml <<'TOML'
    [core]
    workflows_dir = "/var/lib/privsep/workflows"

    [server]
    url = "http://127.0.0.1:8780"

    [supervisor]
    name = "node-1"
    credential = "systemd:supervisor.key"
    api_socket = "/run/privsep-server/api/api.sock"
    TOML
    chmod 0644 /etc/privsep/supervisor.toml
    install -m 0644 /tmp/probe.py /var/lib/privsep/workflows/probe.py
    # The test's drop-in: a short watchdog, and a drain long enough for the nap task.
    install -d /etc/systemd/system/{SUPERVISOR}.d
    cat > /etc/systemd/system/{SUPERVISOR}.d/test.conf <<'INI'
    [Service]
    WatchdogSec={WATCHDOG_SEC}
    Environment=PRIVSEP__SUPERVISOR__DRAIN_GRACE={DRAIN_GRACE}
    INI
    systemctl daemon-reload
""")

T = TypeVar("T")


def _strict() -> bool:
    return os.environ.get("PRIVSEP_TESTS_STRICT") == "1"


def _unavailable(why: str) -> None:
    if _strict():
        pytest.fail(f"PRIVSEP_TESTS_STRICT=1 and the real-systemd test cannot run: {why}")
    pytest.skip(f"the real-systemd test needs root, Docker and its image: {why}")


def _image() -> str:
    """The tag of the current image, or why it is not there."""
    if os.geteuid() != 0:
        _unavailable("it runs as root (the image build runs debootstrap)")
    if shutil.which("docker") is None:
        _unavailable("the docker command is missing (apt-get install docker.io)")
    if subprocess.run(["docker", "info"], capture_output=True, check=False).returncode != 0:
        _unavailable("no Docker engine answers (docker info failed)")
    done = subprocess.run([str(BUILD), "--tag"], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        _unavailable(f"{BUILD} --tag failed: {done.stderr.strip()}")
    tag = done.stdout.strip()
    have = subprocess.run(["docker", "image", "inspect", tag], capture_output=True, check=False)
    if have.returncode != 0:
        _unavailable(f"image {tag} is missing; build it with {BUILD.relative_to(ROOT)}")
    return tag


def _source_tar() -> bytes:
    """The tree under test, as the deployment guide's /opt/privsep/src."""
    buf = io.BytesIO()

    def keep(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        name = Path(info.name).name
        if name == "__pycache__" or name.endswith((".egg-info", ".pyc")):
            return None
        info.uid = info.gid = 0
        info.uname = info.gname = "root"
        return info

    with tarfile.open(fileobj=buf, mode="w") as tar:
        for part in ("pyproject.toml", "README.md", "LICENSE", "src", "docs", "packaging"):
            tar.add(ROOT / part, arcname=f"src/{part}", filter=keep)
        probe = PROBE.encode()
        info = tarfile.TarInfo("probe.py")
        info.size, info.mode = len(probe), 0o644
        tar.addfile(info, io.BytesIO(probe))
    return buf.getvalue()


class Machine:
    """One booted container: run commands in it, ask its systemd, read its journal."""

    def __init__(self, name: str) -> None:
        self.name = name

    def sh(
        self, script: str, *, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            ["docker", "exec", self.name, "bash", "-c", script],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and done.returncode != 0:
            pytest.fail(
                f"in the container, exit {done.returncode}: {script.strip()[:300]}\n"
                f"stdout:\n{done.stdout[-3000:]}\nstderr:\n{done.stderr[-3000:]}"
            )
        return done

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.sh(f"systemctl show {unit} -p {','.join(props)}").stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, unit: str, since: str = "") -> str:
        cursor = f" --after-cursor='{since}'" if since else ""
        return self.sh(f"journalctl -q --no-pager -o cat -u {unit}{cursor}").stdout

    def cursor(self) -> str:
        """The journal's position now: a later :meth:`journal` shows only what came after."""
        out = self.sh("journalctl -q --no-pager -n 1 -o json").stdout.strip()
        return str(json.loads(out.splitlines()[-1])["__CURSOR"]) if out else ""

    def runner_json(self, *args: str, timeout: float = 180) -> Any:
        done = self.sh(f"{RUNNER} {' '.join(args)} --json", timeout=timeout, check=False)
        assert done.stdout.strip(), f"runner {args}: {done.stderr}"
        return json.loads(done.stdout)

    def wait_for(self, what: str, predicate: Callable[[], T | None], timeout: float = 60) -> T:
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                pytest.fail(
                    f"timed out after {timeout:g} s waiting for {what}\n"
                    + self.sh("journalctl -q --no-pager -n 80", check=False).stdout
                )
            time.sleep(0.5)

    def booted(self) -> bool:
        """Whether systemd has finished booting (before it listens, ``systemctl`` fails)."""
        state = self.sh("systemctl is-system-running --wait", check=False, timeout=90)
        return state.stdout.strip() in ("running", "degraded")

    def ensure_running(self) -> None:
        """Both services up, as every test expects to find and leave them."""
        self.sh(f"systemctl start {SERVER} {SUPERVISOR}", timeout=120)
        for unit in (SERVER, SUPERVISOR):
            state = self.show(unit, "ActiveState")["ActiveState"]
            assert state == "active", f"{unit} is {state}:\n{self.journal(unit)[-3000:]}"

    def assert_no_traceback(self) -> None:
        text = self.sh("journalctl -q --no-pager -o cat").stdout
        assert "Traceback (most recent call last)" not in text, text[-6000:]

    def run_workflow(self, workflow: str) -> dict[str, Any]:
        """Trigger a run once discovery has parsed the workflow; its final state."""

        def parsed() -> bool:
            listed = self.runner_json("workflows", "list")
            rows = listed.get("workflows", listed) if isinstance(listed, dict) else listed
            return any(w.get("id") == workflow for w in rows)

        self.wait_for(f"workflow {workflow} to be parsed", parsed)
        run: dict[str, Any] = self.runner_json(
            "runs", "trigger", workflow, "--wait", "--timeout", "150"
        )
        return run


@pytest.fixture(scope="module")
def machine() -> Iterator[Machine]:
    image = _image()
    name = f"privsep-systemd-test-{uuid.uuid4().hex[:8]}"
    subprocess.run(
        ["docker", "run", "-d", "--name", name, *DOCKER_RUN, image, "sh", "-c", BOOT],
        check=True,
        capture_output=True,
        timeout=60,
    )
    try:
        m = Machine(name)
        m.wait_for("systemd to boot", m.booted, timeout=90)
        subprocess.run(
            ["docker", "cp", "-", f"{name}:/opt/privsep/"],
            input=_source_tar(),
            check=True,
            capture_output=True,
            timeout=60,
        )
        m.sh("mv /opt/privsep/probe.py /tmp/probe.py")
        m.sh(SETUP, timeout=300)
        yield m
    finally:
        # PRIVSEP_SYSTEMD_KEEP=1 leaves the container to look into (docker exec -it NAME bash).
        if os.environ.get("PRIVSEP_SYSTEMD_KEEP") != "1":
            subprocess.run(["docker", "rm", "-f", name], capture_output=True, check=False)


@pytest.fixture
def running(machine: Machine) -> Iterator[Machine]:
    machine.ensure_running()
    yield machine
    machine.ensure_running()
    machine.assert_no_traceback()


# --- start: Type=notify ----------------------------------------------------------------------


def test_start_returns_once_each_service_is_ready(machine: Machine) -> None:
    """``systemctl start`` waits for READY=1: when it returns, the server answers and the
    supervisor has a session with it and says so in its status."""
    machine.sh(f"systemctl stop {SUPERVISOR} {SERVER}")
    since = machine.cursor()
    machine.sh(f"systemctl start {SERVER}")
    # No retry: the server listens by the time start returns.
    health = machine.sh(
        f'{VENV}/bin/python -c "import urllib.request as u; '
        "print(u.urlopen('http://127.0.0.1:8780/v1/health', timeout=5).status)\""
    )
    assert health.stdout.strip() == "200"
    machine.sh(f"systemctl start {SUPERVISOR}")
    sup = machine.show(SUPERVISOR, "ActiveState", "SubState", "StatusText", "Type")
    assert sup["Type"] == "notify"
    assert (sup["ActiveState"], sup["SubState"]) == ("active", "running")
    assert sup["StatusText"].startswith("running, parallelism"), sup
    # READY=1 comes after the session and the backend: their log line is already there.
    assert "supervisor node-1 started" in machine.journal(SUPERVISOR, since)
    srv = machine.show(SERVER, "ActiveState", "Type")
    assert srv == {"ActiveState": "active", "Type": "notify"}
    machine.assert_no_traceback()


# --- a workflow in a real sandbox ------------------------------------------------------------


def test_a_workflow_runs_to_success_in_a_sandbox(running: Machine) -> None:
    run = running.run_workflow("probe")
    assert run["state"] == "success", json.dumps(run, indent=2)
    [attempt] = run["attempts"]
    log = running.sh(f"cat /var/log/privsep/task-{attempt['id']}.log").stdout
    # It ran in the process backend's sandbox: as a pool uid, not root.
    assert "probe: systemd variables seen: []" in log, log
    assert "probe: credential not readable:" in log, log
    journal = running.journal(SUPERVISOR)
    assert "process backend" in journal


def test_only_the_supervisors_own_cgroup_subtree_is_writable(running: Machine) -> None:
    """``ProtectControlGroups=`` leaves the supervisor (and anything that escapes a sandbox as
    root) the cgroup subtree it was delegated and nothing else: in its mount namespace a
    sibling cgroup cannot be made, its own subtree holds the sandbox cgroups and takes a
    new one."""
    pid = running.show(SUPERVISOR, "MainPID")["MainPID"]
    group = running.show(SUPERVISOR, "ControlGroup")["ControlGroup"]
    # The cgroup v2 tree: the hybrid layout's unified tree, or the whole of /sys/fs/cgroup.
    tree = running.sh(
        "if [ -e /sys/fs/cgroup/unified/cgroup.procs ]; then echo /sys/fs/cgroup/unified;"
        " else echo /sys/fs/cgroup; fi"
    ).stdout.strip()
    own = f"{tree}{group}"
    sibling = f"{tree}{os.path.dirname(group)}/privsep-test-sibling"
    inside = f"nsenter -t {pid} -m --"
    outside = running.sh(f"{inside} mkdir {sibling}", check=False)
    running.sh(f"rmdir {sibling} 2>/dev/null || true")
    assert outside.returncode != 0, f"the supervisor could create {sibling}"
    assert "Read-only file system" in outside.stderr, outside.stderr
    assert running.sh(f"{inside} test -d {own}/privsep-sandboxes", check=False).returncode == 0
    probe = f"{own}/privsep-test-probe"
    running.sh(f"{inside} mkdir {probe} && {inside} rmdir {probe}")


# --- reload ----------------------------------------------------------------------------------


def test_reload_rereads_the_configuration(running: Machine) -> None:
    pid = running.show(SUPERVISOR, "MainPID")["MainPID"]
    since = running.cursor()
    conf = "/etc/privsep/supervisor.toml"
    running.sh(f"cp {conf} /tmp/sup.toml && printf 'parallelism = 3\\n' >> {conf}")
    try:
        running.sh(f"systemctl reload {SUPERVISOR}")
        running.wait_for(
            "the supervisor to reload",
            lambda: (
                "SIGHUP: configuration reloaded (parallelism 3)"
                in running.journal(SUPERVISOR, since)
            ),
        )
    finally:
        running.sh(f"cp /tmp/sup.toml {conf} && systemctl reload {SUPERVISOR}")
    # The same process: a reload, not a restart.
    assert running.show(SUPERVISOR, "MainPID")["MainPID"] == pid


# --- the watchdog ----------------------------------------------------------------------------


def test_a_stuck_supervisor_is_killed_by_the_watchdog_and_restarted(running: Machine) -> None:
    before = running.show(SUPERVISOR, "MainPID", "NRestarts")
    since = running.cursor()
    running.sh(f"kill -STOP {before['MainPID']}")

    def restarted() -> bool:
        now = running.show(SUPERVISOR, "MainPID", "NRestarts", "ActiveState", "SubState")
        return (
            now["NRestarts"] != before["NRestarts"]
            and now["MainPID"] not in ("0", before["MainPID"])
            and (now["ActiveState"], now["SubState"]) == ("active", "running")
        )

    running.wait_for("the watchdog to restart the supervisor", restarted, timeout=90)
    journal = running.sh(f"journalctl -q --no-pager -o cat --after-cursor='{since}'").stdout
    assert f"{SUPERVISOR}: Watchdog timeout" in journal, journal
    # The new supervisor works: a workflow still runs.
    run = running.run_workflow("probe")
    assert run["state"] == "success", json.dumps(run, indent=2)


# --- stop drains -----------------------------------------------------------------------------


def test_stop_drains_a_running_task_and_stops_cleanly(running: Machine) -> None:
    running.wait_for(
        "workflow nap to be parsed",
        lambda: any(w.get("id") == "nap" for w in _rows(running.runner_json("workflows", "list"))),
    )
    run = running.runner_json("runs", "trigger", "nap")

    def napping() -> str | None:
        shown = running.runner_json("runs", "show", run["id"])
        for a in shown.get("attempts", []):
            if a["state"] == "running":
                log = running.sh(f"cat /var/log/privsep/task-{a['id']}.log", check=False).stdout
                return str(a["id"]) if "napping" in log else None
        return None

    attempt = running.wait_for("the nap task to start", napping)
    since = running.cursor()
    # Returns only once the supervisor has drained and exited.
    running.sh(f"systemctl stop {SUPERVISOR}", timeout=DRAIN_GRACE + 60)
    after = running.show(SUPERVISOR, "ActiveState", "Result", "ExecMainStatus")
    assert after == {"ActiveState": "inactive", "Result": "success", "ExecMainStatus": "0"}
    log = running.sh(f"cat /var/log/privsep/task-{attempt}.log").stdout
    assert "woke up" in log, log
    shown = running.runner_json("runs", "show", run["id"])
    assert shown["state"] == "success", json.dumps(shown, indent=2)
    journal = running.journal(SUPERVISOR, since)
    assert "draining: no new claims" in journal, journal
    assert "killed" not in journal.lower(), journal


def _rows(listed: Any) -> list[dict[str, Any]]:
    rows = listed.get("workflows", listed) if isinstance(listed, dict) else listed
    return list(rows)


# --- the credential --------------------------------------------------------------------------


def test_the_credential_is_the_services_alone(running: Machine) -> None:
    """systemd hands the key to the supervisor only: root's file, 0400 in a 0500 directory;
    another user cannot read it, ``systemctl show`` names only its source, and no sandbox sees
    it (the probe task in the workflow test looks for it from inside)."""
    stat = running.sh(f"stat -c '%a %U' {CREDENTIAL} $(dirname {CREDENTIAL})").stdout.split("\n")
    assert stat[:2] == ["400 root", "500 root"], stat
    key = running.sh("cat /etc/privsep/supervisor.key").stdout
    assert running.sh(f"cat {CREDENTIAL}").stdout == key  # it is delivered, not empty
    for user in ("privsep", "nobody"):
        other = running.sh(f"runuser -u {user} -- cat {CREDENTIAL}", check=False)
        assert other.returncode != 0 and not other.stdout
    secret_lines = [line for line in key.splitlines() if len(line) > 16 and "-----" not in line]
    assert secret_lines
    shown = running.sh(f"systemctl show {SUPERVISOR}").stdout
    journal = running.sh("journalctl -q --no-pager -o cat").stdout
    for line in secret_lines:
        assert line not in shown and line not in journal
    # No process of the unit but the supervisor itself (whose /proc environ is what execve
    # gave it) carries the credentials directory: the zygote and the pre-warmed sandboxes
    # were started after it scrubbed its environment.
    main = running.show(SUPERVISOR, "MainPID")["MainPID"]
    unit_pids = running.sh(
        f"cat $(find /sys/fs/cgroup/unified/system.slice/{SUPERVISOR} -name cgroup.procs)"
    ).stdout.split()
    children = [pid for pid in unit_pids if pid != main]
    assert children, "the supervisor runs no zygote or pre-warmed sandbox to look at"
    holders = running.sh(
        "grep -l -a privsep-supervisor.service "
        + " ".join(f"/proc/{pid}/environ" for pid in children),
        check=False,
    ).stdout
    assert not holders.strip(), holders


# --- the journal -----------------------------------------------------------------------------


def test_the_journal_has_no_traceback_and_names_unenforced_limits(running: Machine) -> None:
    """Docker mounts the v1 controllers read-only here: the supervisor starts all the same and
    says in one line which sandbox limits it cannot enforce. Where a controller is writable,
    the start-up line lists it instead."""
    journal = running.journal(SUPERVISOR)
    [*_, started] = [line for line in journal.splitlines() if "supervisor node-1 started" in line]
    warned = [line for line in journal.splitlines() if "sandbox limits NOT enforced" in line]
    in_force = started.split("; ", 1)[1] if "; " in started else ""
    for controller, meaning in (("memory", "memory limit"), ("pids", "process count limit")):
        if controller not in in_force:
            assert warned and meaning in warned[-1], journal
    writable = running.sh("test -w /sys/fs/cgroup/memory", check=False).returncode == 0
    if not writable:  # this host's Docker: the warning must be there
        assert warned, journal
    running.assert_no_traceback()
