"""The container backend against a real Docker engine: real containers, no mocks.

The first half checks the handle's contract (output, exit status, timeout, kill, clean-up).
The second half attacks each of DESIGN.md's container claims from inside a real container,
as the untrusted code would: a claim counts as tested only if breaking the backend's option
for it makes its test fail (the commit that added these tests says how each was checked).

Sandbox uids come from 207000-207999 (this file's range; never shared with other tests).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sandbox_kit import RUN_PATH, script

from docker_kit import containers_labelled, require_docker
from privsep.sandbox import ExitReason, Limits, SandboxSpec, SandboxUnavailable, UidPool
from privsep.sandbox._steps import SetupStep
from privsep.sandbox.container import ContainerBackend, ContainerHandle
from privsep.sandbox.image import default_image

MiB = 1 << 20
SUPERVISOR = f"pytest-ctr-{os.getpid()}"


@pytest.fixture(scope="module")
def ctr() -> Iterator[ContainerBackend]:
    require_docker()
    with ContainerBackend(uid_pool=UidPool(207_000, 64), supervisor=SUPERVISOR) as b:
        yield b
    assert containers_labelled(SUPERVISOR) == []


@pytest.fixture
def area() -> Iterator[Path]:
    """A short, world-searchable directory on the host disk (not pytest's 0700 tmp_path)."""
    d = Path(tempfile.mkdtemp(prefix="ctr-", dir="/var/tmp"))
    d.chmod(0o755)
    (d / "bundle").mkdir(mode=0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def spec_for(area: Path, source: str, *args: str, **kw: Any) -> SandboxSpec:
    path = script(area / "bundle", f"s{time.monotonic_ns()}.py", source)
    kw.setdefault("limits", Limits(wall_seconds=60))
    return SandboxSpec(
        kind=kw.pop("kind", "task"),
        entry_point=kw.pop("entry_point", RUN_PATH),
        argv=(str(path), *args),
        workdir=str(area / f"work-{path.stem}"),
        bundle_paths=(str(area / "bundle"),),
        **kw,
    )


def run(ctr: ContainerBackend, spec: SandboxSpec, timeout: float = 90) -> ContainerHandle:
    handle = ctr.launch(spec)
    status = handle.wait(timeout)
    assert status is not None, f"sandbox {spec.sandbox_id} did not end within {timeout} s"
    return handle


def report(handle: ContainerHandle) -> dict[str, Any]:
    """The JSON object the attacking script printed as its last line."""
    text = handle.output().text
    lines = [line for line in text.splitlines() if line.startswith("{")]
    assert lines, f"no report from the sandbox ({handle.status}):\n{text}"
    return dict(json.loads(lines[-1]))


def no_container_of(handle: ContainerHandle) -> bool:
    return not any(handle.sandbox_id in name for name in containers_labelled(SUPERVISOR))


# --- the handle's contract ---------------------------------------------------------------------


def test_entry_point_runs_and_its_output_and_exit_status_come_back(
    ctr: ContainerBackend, area: Path
) -> None:
    spec = spec_for(
        area,
        """
        import os, sys
        print("out: uid", os.getuid(), "pid", os.getpid(), "payload", privsep_payload.decode())
        print("env", sorted(os.environ.items()))
        print("err: to stderr", file=sys.stderr)
        sys.exit(3)
        """,
        payload=b"hello payload",
        env={"GREETING": "hi"},
    )
    handle = ctr.launch(spec)
    assert handle.wait_running(60)
    status = handle.wait(60)
    assert status is not None and status.reason is ExitReason.FAILED, status
    assert status.exit_code == 3 and "exited with code 3" in status.detail
    text = handle.output().text
    assert f"out: uid {handle.uid} pid 1 payload hello payload" in text  # its PID 1, a pool uid
    assert 207_000 <= handle.uid < 207_064
    assert "env [('GREETING', 'hi')]" in text  # the spec's environment and nothing else
    assert "err: to stderr" in text
    assert handle.output().path == str(ctr._log_dir) + f"/{spec.sandbox_id}.log"
    assert no_container_of(handle)
    assert handle.uid not in ctr.uid_pool.in_use()
    assert oct(os.stat(spec.workdir).st_mode & 0o777) == "0o700"
    assert os.stat(spec.workdir).st_uid == 0  # handed back to root for the uid's next holder


def test_a_clean_exit_succeeds_and_the_log_goes_where_the_spec_says(
    ctr: ContainerBackend, area: Path
) -> None:
    log_path = area / "task.log"
    handle = run(ctr, spec_for(area, "print('done')", log_path=str(log_path)))
    assert handle.status is not None and handle.status.ok, handle.status
    assert log_path.read_text() == "done\n"


def test_a_bad_entry_point_is_a_setup_failure(ctr: ContainerBackend, area: Path) -> None:
    handle = run(ctr, spec_for(area, "pass", entry_point="privsep.no_such_module:main"))
    status = handle.status
    assert status is not None and status.reason is ExitReason.SETUP_FAILED, status
    assert status.setup_step is SetupStep.ENTRY_POINT
    assert "no_such_module" in status.detail
    assert not handle.wait_running(0)


def test_the_wall_clock_limit_kills_the_container(ctr: ContainerBackend, area: Path) -> None:
    limits = Limits(wall_seconds=1.5, kill_grace_seconds=1)
    code = "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\ntime.sleep(120)"
    started = time.monotonic()
    handle = run(ctr, spec_for(area, code, limits=limits), timeout=60)
    took = time.monotonic() - started
    status = handle.status
    assert status is not None and status.reason is ExitReason.TIMEOUT, status
    assert status.signal == 9  # it ignored SIGTERM, so the grace ran out
    assert "wall-clock limit of 1.5 s" in status.detail
    assert took < 20, took
    assert no_container_of(handle)


def test_kill_terminates_at_once_or_after_the_grace(ctr: ContainerBackend, area: Path) -> None:
    code = "import time\nprint('sleeping', flush=True)\ntime.sleep(120)"
    handle = ctr.launch(spec_for(area, code))
    assert handle.wait_running(60)
    handle.kill(grace=5)  # SIGTERM: the entry code turns it into exit 143
    status = handle.wait(30)
    assert status is not None and status.reason is ExitReason.KILLED, status
    assert status.signal == 15
    hard = ctr.launch(spec_for(area, code))
    assert hard.wait_running(60)
    hard.kill(grace=0)
    status = hard.wait(30)
    assert status is not None and status.reason is ExitReason.KILLED and status.signal == 9
    assert no_container_of(handle) and no_container_of(hard)


def test_close_kills_and_removes_every_container_of_the_backend(area: Path) -> None:
    require_docker()
    name = f"{SUPERVISOR}-close"
    backend = ContainerBackend(uid_pool=UidPool(207_900, 8), supervisor=name)
    try:
        handles = [backend.launch(spec_for(area, "import time; time.sleep(120)")) for _ in (1, 2)]
        for h in handles:
            assert h.wait_running(60)
        assert len(containers_labelled(name)) == 2
    finally:
        backend.close()
    assert all(h.status is not None and h.status.reason is ExitReason.KILLED for h in handles)
    assert containers_labelled(name) == []


def test_a_new_backend_removes_containers_a_dead_one_left(area: Path) -> None:
    require_docker()
    name = f"{SUPERVISOR}-stale"
    # A container as a crashed supervisor would leave it: labelled, still running.
    subprocess.run(
        ["docker", "run", "-d", "--network", "none", "--label", f"privsep.supervisor={name}",
         default_image(), "python3", "-c", "import time; time.sleep(120)"],
        check=True, capture_output=True,
    )  # fmt: skip
    assert len(containers_labelled(name)) == 1
    backend = ContainerBackend(uid_pool=UidPool(207_910, 2), supervisor=name)
    try:
        assert containers_labelled(name) == []  # gone at start, not only at close
    finally:
        backend.close()


def test_errors_for_people_missing_image_no_engine_no_sdk() -> None:
    require_docker()
    with pytest.raises(SandboxUnavailable) as missing:
        ContainerBackend(image="privsep-sandbox:no-such-tag", supervisor="pytest-probe")
    assert str(missing.value) == (
        "privsep: the sandbox image privsep-sandbox:no-such-tag is missing; build it with "
        "packaging/container/build-image --tag privsep-sandbox:no-such-tag"
    )
    probe = textwrap.dedent("""
        import sys
        if sys.argv[1] == "nosdk":
            sys.modules["docker"] = None  # as if the container extra were not installed
        from privsep.sandbox.container import ContainerBackend
        ContainerBackend()
    """)
    env = {**os.environ, "DOCKER_HOST": "unix:///nonexistent/docker.sock"}
    for case, expected in (
        ("noengine", "privsep: no Docker engine answers at unix:///nonexistent/docker.sock ("),
        ("nosdk", "privsep: the container backend needs the Docker SDK: pip install"),
    ):
        done = subprocess.run(
            [sys.executable, "-c", probe, case], env=env, capture_output=True, text=True
        )
        last = done.stderr.strip().splitlines()[-1]
        assert expected in last and "\n" not in str(last), done.stderr


# --- attacks from inside --------------------------------------------------------------------------

ATTACK_PRIVILEGES = """
import errno, json, os, socket, stat
out = {}
lines = open("/proc/self/status").read().splitlines()
status = dict(line.split(":\\t", 1) for line in lines if ":\\t" in line)
out["uids"] = status["Uid"].split()
out["caps"] = {k: status[k] for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")}
out["no_new_privs"] = status["NoNewPrivs"]
out["seccomp"] = status["Seccomp"]
def attempt(name, fn):
    try:
        fn()
        out[name] = "allowed"
    except OSError as exc:
        out[name] = errno.errorcode.get(exc.errno, str(exc.errno))
attempt("chown", lambda: os.chown("/tmp", os.getuid(), os.getuid()))
attempt("mknod", lambda: os.mknod("/tmp/null2", 0o666 | stat.S_IFCHR, os.makedev(1, 3)))
attempt("raw_socket", lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP))
attempt("setuid0", lambda: os.setuid(0))
attempt("write_root", lambda: open("/owned", "w"))
attempt("write_etc", lambda: open("/etc/passwd", "a"))
attempt("write_var_tmp", lambda: open("/var/tmp/x", "w"))  # 1777: only the read-only root stops it
attempt("write_code", lambda: open("/usr/lib/python3/dist-packages/privsep/x.py", "w"))
attempt("write_bundle", lambda: open(os.path.dirname(__file__) + "/x", "w"))
attempt("write_workdir", lambda: open("scratch", "w").write("ok"))
print(json.dumps(out))
"""


def test_not_root_no_capabilities_no_new_privs_and_a_read_only_root(
    ctr: ContainerBackend, area: Path
) -> None:
    handle = run(ctr, spec_for(area, ATTACK_PRIVILEGES))
    out = report(handle)
    assert out["uids"] == [str(handle.uid)] * 4
    assert set(out["caps"].values()) == {"0000000000000000"}, out["caps"]
    assert out["no_new_privs"] == "1"
    assert out["seccomp"] == "2"  # Docker's default profile is on
    for attack in ("chown", "mknod", "raw_socket", "setuid0"):
        assert out[attack] == "EPERM", (attack, out[attack])
    for attack in ("write_root", "write_var_tmp", "write_code", "write_bundle"):
        assert out[attack] == "EROFS", (attack, out[attack])
    assert out["write_etc"] in ("EACCES", "EROFS")
    assert out["write_workdir"] == "allowed"


def test_tmp_is_writable_size_capped_and_noexec(ctr: ContainerBackend, area: Path) -> None:
    code = """
    import errno, json, os, subprocess
    out = {}
    chunk = b"x" * (1 << 20)
    written = 0
    try:
        with open("/tmp/fill", "wb") as fh:
            for _ in range(64):
                fh.write(chunk)
                fh.flush()
                written += 1
    except OSError as exc:
        out["fill_error"] = errno.errorcode[exc.errno]
    out["written_mib"] = written
    os.unlink("/tmp/fill")
    with open("/tmp/run.sh", "w") as fh:
        fh.write("#!/bin/sh\\necho ran\\n")
    os.chmod("/tmp/run.sh", 0o755)
    try:
        subprocess.run(["/tmp/run.sh"], check=True)
        out["exec"] = "allowed"
    except PermissionError:
        out["exec"] = "EACCES"
    print(json.dumps(out))
    """
    limits = Limits(wall_seconds=60, tmp_bytes=8 * MiB)
    out = report(run(ctr, spec_for(area, code, limits=limits)))
    assert out["fill_error"] == "ENOSPC"
    assert 6 <= out["written_mib"] <= 8, out
    assert out["exec"] == "EACCES"


@pytest.fixture
def host_listener() -> Iterator[tuple[socket.socket, list[str]]]:
    """A TCP listener on every host address, and those addresses (loopback first)."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("0.0.0.0", 0))  # noqa: S104 - reachable from anywhere on purpose
    listener.listen(16)
    addresses = ["127.0.0.1"]
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.connect(("192.0.2.1", 9))  # no packet is sent: this only picks the route's source
        addresses.append(udp.getsockname()[0])
    yield listener, addresses
    listener.close()


CONNECT = """
import json, socket, sys
port = int(sys.argv[1])
out = {"interfaces": sorted(l.split(":")[0].strip() for l in open("/proc/net/dev").readlines()[2:])}
for address in sys.argv[2:]:
    try:
        socket.create_connection((address, port), timeout=3).close()
        out[address] = "connected"
    except OSError as exc:
        out[address] = type(exc).__name__
print(json.dumps(out))
"""


def test_network_none_reaches_no_host_address_and_host_does(
    ctr: ContainerBackend, area: Path, host_listener: tuple[socket.socket, list[str]]
) -> None:
    listener, addresses = host_listener
    port = str(listener.getsockname()[1])
    out = report(run(ctr, spec_for(area, CONNECT, port, *addresses)))
    assert out["interfaces"] == ["lo"]
    for address in addresses:
        assert out[address] != "connected", (address, out)
    # The same probe with the policy's "host" reaches the listener: the probe can tell.
    out = report(run(ctr, spec_for(area, CONNECT, port, "127.0.0.1", network="host")))
    assert out["127.0.0.1"] == "connected", out


def test_no_docker_socket_and_none_of_the_supervisors_files_inside(
    ctr: ContainerBackend, area: Path
) -> None:
    # A supervisor home as `runner` lays it out, with the workflows folder inside it.
    home = area / "home"
    for sub in ("credentials", "keys", "state", "workflows"):
        (home / sub).mkdir(parents=True, mode=0o755)
    (home / "credentials" / "supervisor.key").write_text("SECRET-KEY")
    (home / "privsep.toml").write_text("[server]\nfernet_key = 'SECRET-CONFIG'\n")
    (home / "state" / "privsep.db").write_text("SECRET-DB")
    for path in home.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)  # readable, were it visible
    secrets = [home / "credentials", home / "keys", home / "state", home / "privsep.toml"]
    code = """
    import json, os, sys
    out = {}
    for path in ["/var/run/docker.sock", "/run/docker.sock", "/etc/privsep", *sys.argv[1:]]:
        try:
            if os.path.isdir(path):
                out[path] = "listed " + ",".join(sorted(os.listdir(path)))
            else:
                out[path] = "read " + open(path).read()
        except FileNotFoundError:
            out[path] = "absent"
        except PermissionError:
            out[path] = "denied"
    try:
        import privsep.runner
        out["trusted_code"] = "importable"
    except ImportError:
        out["trusted_code"] = "absent"
    print(json.dumps(out))
    """
    probes = [str(p) for p in secrets] + [str(home / "credentials" / "supervisor.key")]
    # The workflows folder alone is mounted: nothing of the rest of the home exists inside.
    spec = spec_for(area, code, *probes, hidden_paths=tuple(str(p) for p in secrets))
    spec = dataclasses.replace(spec, bundle_paths=(*spec.bundle_paths, str(home / "workflows")))
    out = report(run(ctr, spec))
    assert out.pop("trusted_code") == "absent"  # the image carries no runner, server, secrets
    assert set(out.values()) == {"absent"}, out
    # A bundle path that holds them (the home itself): each is covered, empty and unreadable.
    spec = dataclasses.replace(spec, bundle_paths=(*spec.bundle_paths, str(home)))
    out = report(run(ctr, spec))
    out.pop("trusted_code")
    assert "SECRET" not in json.dumps(out), out
    for path in probes:
        assert out[path] in ("denied", "absent", "listed "), (path, out[path])


def test_only_the_listed_mounts_carry_anything_of_the_host(
    ctr: ContainerBackend, area: Path
) -> None:
    sock_dir = area / "sock"
    sock_dir.mkdir(mode=0o700)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(sock_dir / "cred.sock"))
    code = """
    import json
    mounts = []
    for line in open("/proc/self/mountinfo"):
        fields = line.split()
        sep = fields.index("-")
        mounts.append({"dev": fields[2], "root": fields[3], "at": fields[4], "fs": fields[sep + 1]})
    print(json.dumps({"mounts": mounts}))
    """
    spec = spec_for(area, code, credential_socket=str(sock_dir / "cred.sock"))
    try:
        mounts = report(run(ctr, spec))["mounts"]
    finally:
        listener.close()
    host_dev = os.stat(area).st_dev
    disk = f"{os.major(host_dev)}:{os.minor(host_dev)}"
    from_disk = {m["at"]: m["root"] for m in mounts if m["dev"] == disk}
    docker_files = {"/etc/resolv.conf", "/etc/hostname", "/etc/hosts"}
    assert set(from_disk) == {*spec.bundle_paths, spec.workdir, str(sock_dir / "cred.sock")} | (
        docker_files
    ), from_disk
    docker_root = ctr._client.info()["DockerRootDir"]
    for at in docker_files:  # Docker's own generated files for this container, nothing else
        assert from_disk[at].startswith(f"{docker_root}/containers/"), from_disk[at]
    kernel_fs = {"overlay", "proc", "tmpfs", "devpts", "sysfs", "cgroup", "cgroup2", "mqueue"}
    others = {m["fs"] for m in mounts if m["dev"] != disk}
    assert others <= kernel_fs, others


def test_the_pids_limit_stops_a_fork_bomb(ctr: ContainerBackend, area: Path) -> None:
    code = """
    import json, os, time
    children = 0
    error = None
    for _ in range(500):
        try:
            pid = os.fork()
        except OSError as exc:
            error = exc.strerror
            break
        if pid == 0:
            time.sleep(30)
            os._exit(0)
        children += 1
    print(json.dumps({"children": children, "error": error}), flush=True)
    """
    limits = Limits(wall_seconds=60, pids=16)
    handle = run(ctr, spec_for(area, code, limits=limits))
    out = report(handle)
    assert out["error"] == "Resource temporarily unavailable", out
    assert out["children"] < 16, out
    assert handle.status is not None and handle.status.ok, handle.status  # PID 1 took them all
    assert no_container_of(handle)


def test_the_memory_limit_kills_a_hog_and_says_so(ctr: ContainerBackend, area: Path) -> None:
    code = """
    hog = []
    print("allocating", flush=True)
    for _ in range(1024):
        hog.append(bytearray(1 << 20))  # zero-filled: every page is touched
    print("survived", flush=True)
    """
    limits = Limits(wall_seconds=60, memory_bytes=96 * MiB)
    handle = run(ctr, spec_for(area, code, limits=limits))
    status = handle.status
    assert status is not None and status.reason is ExitReason.MEMORY_LIMIT, status
    assert f"memory limit of {96 * MiB} bytes" in status.detail
    assert "survived" not in handle.output().text


def test_the_credential_socket_answers_the_container_process_and_no_other(
    ctr: ContainerBackend, area: Path
) -> None:
    from privsep.runner.supervisor.credsock import CredentialServer

    root = tempfile.mkdtemp(prefix="cs", dir="/tmp")
    os.chmod(root, 0o711)
    violations: list[tuple[str, str]] = []
    server = CredentialServer(
        proxy_handler=lambda *a: (500, None), on_violation=lambda s, r: violations.append((s, r))
    )
    server.start()
    code = """
    import json, os, subprocess, sys
    from privsep.client._transport import SocketChannel
    from privsep.client._wire import TokenRequest
    path = os.environ["PRIVSEP_CREDENTIAL_SOCKET"]
    reply = SocketChannel(path).exchange(TokenRequest(), expect="token", timeout=20)
    child = subprocess.run(
        [sys.executable, "-I", "-c",
         "import os\\nfrom privsep.client._transport import SocketChannel\\n"
         "from privsep.client._wire import TokenRequest\\n"
         "r = SocketChannel(os.environ['PRIVSEP_CREDENTIAL_SOCKET']).exchange("
         "TokenRequest(), expect='token', timeout=20)\\nprint(r.token)"],
        capture_output=True, text=True, check=True)
    print(json.dumps({"pid": os.getpid(), "token": reply.token, "child": child.stdout.strip()}))
    """
    try:
        entry = server.open_socket("ctrcred", directory_root=root)
        spec = spec_for(area, code, credential_socket=entry.path,
                        env={"PRIVSEP_CREDENTIAL_SOCKET": entry.path})  # fmt: skip
        handle = ctr.launch(spec)
        assert handle.pid is not None
        # What the supervisor does: bind the socket to the handle's pid and the pool uid.
        entry.bind_process(handle.pid, handle.uid)
        entry.set_token("tok-" + "x" * 20, int(time.time()) + 600)
        assert handle.wait(90) is not None
        out = report(handle)
        assert out == {"pid": 1, "token": "tok-" + "x" * 20, "child": "tok-" + "x" * 20}, out
        assert entry.counters.peer_rejected == 0 and violations == []

        # Bound to another process (any pid but the container's PID 1): refused.
        other = server.open_socket("ctrcred2", directory_root=root)
        spec = spec_for(area, code, credential_socket=other.path,
                        env={"PRIVSEP_CREDENTIAL_SOCKET": other.path})  # fmt: skip
        bystander = subprocess.Popen(["sleep", "60"])
        try:
            handle = ctr.launch(spec)
            other.bind_process(bystander.pid, handle.uid)
            other.set_token("tok-" + "y" * 20, int(time.time()) + 600)
            status = handle.wait(90)
        finally:
            bystander.kill()
            bystander.wait()
        assert status is not None and not status.ok
        assert "tok-" + "y" * 20 not in handle.output().text
        assert other.counters.peer_rejected >= 1
    finally:
        server.close()
        shutil.rmtree(root, ignore_errors=True)
