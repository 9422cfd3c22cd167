"""The OCI image of privsep itself (``packaging/image/build-image``), run as a deployment would.

Against a real PostgreSQL cluster on 127.0.0.1 (this Docker engine has no bridge, so every
container uses the host's network):

- ``runner keys rotate``, ``runner db upgrade`` and the registrations run as one-shot
  containers of the image, like the Kubernetes Job;
- the server runs from the image as its default user (privsep, 10001), with a read-only root,
  every capability dropped and ``no-new-privileges``; it reads the database URL from a mounted
  file (``database.url_file``), never from its environment;
- the supervisor runs from the image too, as root inside the container with only the nine
  capabilities its unit keeps (docs/deployment.md), a read-only root and ``no-new-privileges``,
  plus ``seccomp=unconfined``: Docker's default profile never allows ``pivot_root``, which every
  process-backend sandbox needs;
- an operator on the host triggers a workflow, which runs in a real sandbox to success;
- both containers' ``HEALTHCHECK`` (the image's own, ``runner health --component auto``) turns
  ``healthy``.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from docker_kit import strict
from helpers import clean_env, run_runner
from server.postgres import PostgresCluster, free_port, own_cluster

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
BUILD = ROOT / "packaging" / "image" / "build-image"
IMAGE_UID = 10001
NODE = "node-1"
POOL_FIRST = 180000
POOL_COUNT = 20
# What the supervisor's unit keeps (packaging/systemd/privsep-supervisor.service), and no more.
SUPERVISOR_CAPS = (
    "SETUID",
    "SETGID",
    "SYS_ADMIN",
    "SETPCAP",
    "NET_ADMIN",
    "CHOWN",
    "DAC_OVERRIDE",
    "FOWNER",
    "KILL",
)
HARDENED = ("--read-only", "--tmpfs", "/tmp", "--security-opt", "no-new-privileges")
# The server's containers start as the Kubernetes manifests start them.
INSTALL_SECRETS = (
    "/run/privsep/secrets=/etc/privsep/secret-src/server",
    "/run/privsep/secrets/signing=/etc/privsep/secret-src/signing",
    "--",
)
KUBELET_DATA_DIR = "..2026_12_07_00_00_00.000000001"
WORKFLOW = textwrap.dedent("""
    from privsep.client import Context, Workflow

    wf = Workflow("image_wf")

    @wf.task
    def hello(ctx: Context) -> int:
        import os
        ctx.log.info("sandbox uid %d", os.getuid())
        return os.getuid()
""")


def docker(*args: str, timeout: float = 120, check: bool = True) -> str:
    done = subprocess.run(
        ["docker", *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and done.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} failed ({done.returncode}):\n{done.stderr}")
    return done.stdout


@pytest.fixture(scope="module")
def image() -> str:
    """The image this checkout builds (``scripts/test`` built it; here only the digest is
    checked, or what changed is rebuilt)."""
    why = None
    if os.geteuid() != 0:
        why = "the image tests run as root (debootstrap, files owned by the image's uids)"
    elif (
        shutil.which("docker") is None
        or subprocess.run(
            ["docker", "info"], capture_output=True, check=False, timeout=60
        ).returncode
    ):
        why = "no Docker engine answers"
    if why is not None:
        if strict():
            pytest.fail(f"PRIVSEP_TESTS_STRICT=1 and the image tests cannot run: {why}")
        pytest.skip(why)
    done = subprocess.run(
        [str(BUILD)],
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
        env={**os.environ, "PYTHON": sys.executable},
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def write(path: Path, text: str, mode: int, uid: int = 0) -> Path:
    path.write_text(text)
    os.chown(path, uid, uid)
    path.chmod(mode)
    return path


def kubelet_secret(path: Path, files: dict[str, bytes]) -> None:
    """A directory laid out as the kubelet mounts a Secret volume for a pod with
    ``fsGroup: 10001`` and ``defaultMode: 0440``: each name a symlink into ``..data/``, a
    symlink to a timestamped directory holding root-owned files of group 10001, mode 0440."""
    path.mkdir(mode=0o755)
    os.chown(path, 0, IMAGE_UID)
    data = path / KUBELET_DATA_DIR
    data.mkdir(mode=0o755)
    os.chown(data, 0, IMAGE_UID)
    for name, content in files.items():
        (data / name).write_bytes(content)
        os.chown(data / name, 0, IMAGE_UID)
        (data / name).chmod(0o440)
        (path / name).symlink_to(f"..data/{name}")
    (path / "..data").symlink_to(KUBELET_DATA_DIR)


@dataclass
class Deployment:
    """The host side of one deployment: files to mount, ports, and the containers started."""

    image: str
    root: Path
    port: int
    containers: list[str] = field(default_factory=list)
    session_volume: str = field(default_factory=lambda: f"privsep-session-{secrets.token_hex(4)}")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def server_mounts(self) -> list[str]:
        """What the server's pod mounts: its config, its two Secrets as kubelet lays them
        out (read-only sources), an in-memory directory for their private copies, a home."""
        src = self.root / "secret-src"
        return [
            "-v",
            f"{self.root / 'server-home'}:/var/lib/privsep",
            "-v",
            f"{self.root / 'server.toml'}:/etc/privsep/server.toml:ro",
            "-v",
            f"{src / 'server'}:/etc/privsep/secret-src/server:ro",
            "-v",
            f"{src / 'signing'}:/etc/privsep/secret-src/signing:ro",
            "--tmpfs",
            "/run/privsep:mode=1777",
            "-e",
            "PRIVSEP_CONFIG=/etc/privsep/server.toml",
            "--entrypoint",
            "privsep-install-secrets",
        ]

    def one_shot(self, *args: str, mounts: tuple[str, ...] = ()) -> str:
        """``runner ARGS`` in a throwaway container of the image, as the server's user, its
        secrets installed as in the server's pod (the db-upgrade Job does the same)."""
        return docker(
            "run",
            "--rm",
            "--network",
            "host",
            "--cap-drop",
            "ALL",
            *HARDENED,
            *self.server_mounts(),
            *mounts,
            self.image,
            *INSTALL_SECRETS,
            "runner",
            *args,
        )

    def start(self, name: str, *args: str) -> str:
        container = f"{name}-{secrets.token_hex(4)}"
        docker("run", "-d", "--name", container, "--network", "host", *args)
        self.containers.append(container)
        return container

    def host_runner(self, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        """An operator command on the host, with the operator key registered in the image."""
        env = clean_env(self.root / "operator", {"PRIVSEP__SERVER__URL": self.url, **extra})
        return run_runner(*args, env=env)

    def logs(self) -> str:
        out = []
        for container in self.containers:
            done = subprocess.run(
                ["docker", "logs", "--tail", "80", container],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                timeout=30,
                check=False,
            )
            out.append(f"--- {container}\n{done.stdout}")
        return "\n".join(out)

    def inspect(self, container: str) -> dict[str, object]:
        result: list[dict[str, object]] = json.loads(docker("inspect", container))
        return result[0]

    def wait_healthy(self, container: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        status = ""
        while time.monotonic() < deadline:
            state = self.inspect(container)["State"]
            assert isinstance(state, dict)
            if not state.get("Running"):
                raise AssertionError(f"{container} exited:\n{self.logs()}")
            status = state.get("Health", {}).get("Status", "")
            if status == "healthy":
                return
            time.sleep(0.5)
        raise AssertionError(f"{container} is {status!r}, not healthy\n{self.logs()}")


@pytest.fixture(scope="module")
def deployment(image: str) -> Iterator[Deployment]:
    with own_cluster() as cluster:
        root = Path(tempfile.mkdtemp(prefix="privsep-image-", dir="/tmp"))
        root.chmod(0o755)
        dep = Deployment(image=image, root=root, port=free_port())
        try:
            prepare(dep, cluster)
            yield dep
        finally:
            for container in dep.containers:
                docker("rm", "-f", container, check=False, timeout=60)
            docker("volume", "rm", "-f", dep.session_volume, check=False, timeout=60)
            shutil.rmtree(root, ignore_errors=True)


def prepare(dep: Deployment, cluster: PostgresCluster) -> None:
    """The files a deployment mounts: the server's (owned by the image's user, secrets 0400),
    the supervisor's (root's), the operator's on the host; then the one-shot set-up runs."""
    from cryptography.fernet import Fernet

    root = dep.root
    server_home = root / "server-home"
    # The homes are what a disk-backed emptyDir is: 0777, and for fsGroup 10001 its group
    # and setgid bit; runner makes its own private directories inside.
    server_home.mkdir()
    os.chown(server_home, 0, IMAGE_UID)
    server_home.chmod(0o2777)
    (root / "secret-src").mkdir(mode=0o755)
    # The signing key ring is made where the operator works, then becomes a Secret.
    ring = root / "ring"
    done = dep.host_runner("keys", "rotate", PRIVSEP__SERVER__SIGNING_KEYRING=str(ring))
    assert done.returncode == 0, done.stderr
    kubelet_secret(
        root / "secret-src" / "signing", {p.name: p.read_bytes() for p in ring.iterdir()}
    )
    url = cluster.url(cluster.create_database())
    kubelet_secret(
        root / "secret-src" / "server",
        {"database-url": url.encode(), "fernet.key": Fernet.generate_key()},
    )
    write(
        root / "server.toml",
        textwrap.dedent(f"""
            [database]
            url_file = "/run/privsep/secrets/database-url"

            [server]
            bind = "127.0.0.1:{dep.port}"
            url = "{dep.url}"
            fernet_key_file = "/run/privsep/secrets/fernet.key"
            signing_keyring = "/run/privsep/secrets/signing"
        """),
        0o644,
    )
    # Keys made on the host, as on an operator's or a node's machine.
    for who in ("operator", "supervisor"):
        home = root / who
        home.mkdir(mode=0o700)
        done = dep.host_runner(
            "credentials", "create", "--out", str(home / "credentials" / f"{who}.key")
        )
        assert done.returncode == 0, done.stderr
    sup = root / "supervisor"
    workflows = root / "workflows"
    workflows.mkdir(mode=0o755)
    write(workflows / "image_wf.py", WORKFLOW, 0o644)
    # One supervisor.toml for both containers of the pair, as the DaemonSet's ConfigMap: the
    # refresher reads the credential, the supervisor only the session token file.
    write(
        sup / "supervisor.toml",
        textwrap.dedent(f"""
            [core]
            workflows_dir = "/opt/workflows"

            [server]
            url = "{dep.url}"

            [supervisor]
            name = "{NODE}"
            credential = "/run/privsep/key/supervisor.key"
            session_token_file = "/run/privsep/session/session.token"
            heartbeat_interval = 1.0
            discovery_interval = 0.5
            parallelism = 2

            [sandbox]
            uid_first = {POOL_FIRST}
            uid_count = {POOL_COUNT}
            prewarm = 1

            [token_refresher]
            mode = "privsep"
            token_file = "/run/privsep/session/session.token"
            group = "{IMAGE_UID}"
        """),
        0o644,
    )
    # The nodes' keys as one Secret, each under its node's name.
    kubelet_secret(
        root / "secret-src" / "supervisor-keys",
        {NODE: (sup / "credentials" / "supervisor.key").read_bytes()},
    )
    (sup / "home").mkdir()
    (sup / "home").chmod(0o777)
    docker(
        "volume",
        "create",
        "--driver",
        "local",
        "--opt",
        "type=tmpfs",
        "--opt",
        "device=tmpfs",
        "--opt",
        "o=size=1m",
        dep.session_volume,
    )
    pubs = ("-v", f"{root}/supervisor/credentials/supervisor.key.pub:/etc/privsep/sup.pub:ro")
    pubs += ("-v", f"{root}/operator/credentials/operator.key.pub:/etc/privsep/op.pub:ro")
    dep.one_shot("db", "upgrade")
    dep.one_shot(
        "supervisors", "register", NODE, "--public-key", "/etc/privsep/sup.pub", mounts=pubs
    )
    dep.one_shot(
        "operators", "register", "alice", "--public-key", "/etc/privsep/op.pub", mounts=pubs
    )


def start_server(dep: Deployment) -> str:
    return dep.start(
        "privsep-image-server",
        "--cap-drop",
        "ALL",
        *HARDENED,
        "--health-interval",
        "2s",
        *dep.server_mounts(),
        dep.image,
        *INSTALL_SECRETS,
        "runner",
        "server",
    )


def start_refresher(dep: Deployment) -> str:
    """``runner token-refresher`` as the DaemonSet's sidecar runs it: the image's user, no
    capability, the node's key copied from its Secret into a private in-memory directory."""
    sup = dep.root / "supervisor"
    key = dep.root / "secret-src" / "supervisor-keys" / KUBELET_DATA_DIR / NODE
    return dep.start(
        "privsep-image-refresher",
        "--cap-drop",
        "ALL",
        *HARDENED,
        "--health-interval",
        "2s",
        "--tmpfs",
        "/run/privsep/key",
        "--tmpfs",
        f"/var/lib/privsep:uid={IMAGE_UID},gid={IMAGE_UID},mode=0700",
        "-v",
        f"{dep.session_volume}:/run/privsep/session",
        # What subPathExpr: $(NODE_NAME) mounts: the one key file, not the Secret's links.
        "-v",
        f"{key}:/etc/privsep/key-src/supervisor.key:ro",
        "-v",
        f"{sup / 'supervisor.toml'}:/etc/privsep/supervisor.toml:ro",
        "-e",
        "PRIVSEP_CONFIG=/etc/privsep/supervisor.toml",
        "--entrypoint",
        "privsep-install-secrets",
        dep.image,
        "/run/privsep/key/supervisor.key=/etc/privsep/key-src/supervisor.key",
        "--",
        "runner",
        "token-refresher",
    )


def start_supervisor(dep: Deployment) -> str:
    """``runner supervisor`` beside it: root in its container with the unit's capabilities,
    the session volume read-only, and no key anywhere in its view."""
    sup = dep.root / "supervisor"
    caps = [arg for cap in SUPERVISOR_CAPS for arg in ("--cap-add", cap)]
    return dep.start(
        "privsep-image-supervisor",
        "--user",
        "0:0",
        "--cap-drop",
        "ALL",
        *caps,
        "--security-opt",
        "seccomp=unconfined",
        *HARDENED,
        "--health-interval",
        "2s",
        "-v",
        f"{sup / 'home'}:/var/lib/privsep",
        "-v",
        f"{sup / 'supervisor.toml'}:/etc/privsep/supervisor.toml:ro",
        "-v",
        f"{dep.session_volume}:/run/privsep/session:ro",
        "-v",
        f"{dep.root / 'workflows'}:/opt/workflows:ro",
        "-e",
        "PRIVSEP_CONFIG=/etc/privsep/supervisor.toml",
        dep.image,
        "supervisor",
    )


@dataclass
class Running:
    dep: Deployment
    server: str
    refresher: str
    supervisor: str


@pytest.fixture(scope="module")
def running(deployment: Deployment) -> Running:
    server = start_server(deployment)
    deployment.wait_healthy(server)
    refresher = start_refresher(deployment)
    deployment.wait_healthy(refresher)
    supervisor = start_supervisor(deployment)
    deployment.wait_healthy(supervisor)
    return Running(deployment, server, refresher, supervisor)


def process_status(container: str) -> tuple[list[str], int]:
    """The uids (real, effective, saved, fs) and effective capabilities of PID 1."""
    status = docker("exec", container, "cat", "/proc/1/status").splitlines()
    uids = next(line for line in status if line.startswith("Uid:")).split()[1:]
    caps = next(line for line in status if line.startswith("CapEff:")).split()[1]
    return uids, int(caps, 16)


def test_image_user_is_not_root(image: str) -> None:
    config = json.loads(docker("image", "inspect", image))[0]["Config"]
    assert config["User"] == f"{IMAGE_UID}:{IMAGE_UID}"
    assert config["Healthcheck"]["Test"] == ["CMD", "runner", "health", "--component", "auto"]
    out = docker("run", "--rm", "--network", "none", "--entrypoint", "id", image, "-u")
    assert out.strip() == str(IMAGE_UID)


def test_server_runs_as_non_root_with_database_url_from_a_file(running: Running) -> None:
    dep, server = running.dep, running.server
    assert docker("exec", server, "id", "-u").strip() == str(IMAGE_UID)
    # The process itself, not just what `exec` gets: PID 1 of the container.
    assert process_status(server) == ([str(IMAGE_UID)] * 4, 0)
    env = dep.inspect(server)["Config"]
    assert isinstance(env, dict)
    assert not any("postgresql" in e or "DATABASE" in e for e in env["Env"]), env["Env"]
    url = (dep.root / "secret-src" / "server" / "database-url").read_text().strip()
    assert url not in docker("logs", server, timeout=30)


def test_the_refresher_holds_the_key_and_the_supervisor_does_not(running: Running) -> None:
    dep = running.dep
    # The refresher: the image's user, no capability, its private copy of the key.
    assert process_status(running.refresher) == ([str(IMAGE_UID)] * 4, 0)
    copy = docker(
        "exec", running.refresher, "stat", "-c", "%a %u", "/run/privsep/key/supervisor.key"
    )
    assert copy.split() == ["400", str(IMAGE_UID)]
    token = docker(
        "exec", running.refresher, "stat", "-c", "%a %u %g", "/run/privsep/session/session.token"
    )
    assert token.split() == ["640", str(IMAGE_UID), str(IMAGE_UID)]
    # The supervisor: no key mounted, none in what it can see, and it works (the workflow
    # test) on the session token alone.
    key = (dep.root / "supervisor" / "credentials" / "supervisor.key").read_text()
    mounts = dep.inspect(running.supervisor)["Mounts"]
    assert isinstance(mounts, list)
    assert not any("supervisor-keys" in m["Source"] or "key" in m["Destination"] for m in mounts)
    found = subprocess.run(
        [
            "docker",
            "exec",
            running.supervisor,
            "grep",
            "-rlF",
            key.splitlines()[1],
            "/run",
            "/etc",
            "/var/lib/privsep",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert found.returncode == 1 and found.stdout == "", found.stdout


def test_workflow_runs_to_success_from_the_image(running: Running) -> None:
    dep, supervisor = running.dep, running.supervisor
    deadline = time.monotonic() + 120
    while True:  # the definition file is parsed in a sandbox first
        done = dep.host_runner("runs", "trigger", "image_wf", "--json")
        if done.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}\n{dep.logs()}"
    run_id = str(json.loads(done.stdout)["id"])
    while True:
        shown = dep.host_runner("runs", "show", run_id, "--json")
        assert shown.returncode == 0, shown.stderr
        run = json.loads(shown.stdout)
        if run["state"] not in ("queued", "running") or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert run["state"] == "success", f"{run}\n{dep.logs()}"
    tasks = dep.host_runner("tasks", "list", run_id, "--json")
    assert tasks.returncode == 0, tasks.stderr
    attempts = json.loads(tasks.stdout)["attempts"]
    assert [a["state"] for a in attempts] == ["success"], attempts
    # The task ran in a sandbox the supervisor built inside its container, as a pool uid
    # (its log is the node-local copy in the supervisor's state directory).
    log = docker("exec", supervisor, "runner", "logs", str(attempts[0]["id"]))
    uid = int(re.search(r"sandbox uid (\d+)", log).group(1))  # type: ignore[union-attr]
    assert POOL_FIRST <= uid < POOL_FIRST + POOL_COUNT, log


def test_a_secret_volume_is_refused_as_mounted(deployment: Deployment) -> None:
    """Why the manifests copy each Secret first: the server refuses the kubelet's layout."""
    dep = deployment
    done = subprocess.run(
        [
            "docker",
            "run",
            "--rm",
            "--network",
            "host",
            "--cap-drop",
            "ALL",
            *HARDENED,
            *dep.server_mounts(),
            "-e",
            "PRIVSEP__DATABASE__URL_FILE=/etc/privsep/secret-src/server/database-url",
            dep.image,
            *INSTALL_SECRETS,
            "runner",
            "db",
            "check",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode != 0
    assert "/etc/privsep/secret-src/server/database-url" in done.stderr
    assert "Traceback" not in done.stderr
