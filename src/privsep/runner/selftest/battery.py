"""``runner selftest``: the attack battery, run in real sandboxes on the operator's own host.

The hostile-child suite in ``tests/security`` proves the isolation on the machine that runs CI.
An operator runs privsep on another kernel, with another configuration, perhaps in a container
backend; this command runs the same kind of attacks there, through the backend and the settings
that ``runner supervisor`` would use, and prints one line per attack: ``held`` or ``LEAKED``.

Before any sandbox exists, the selftest plants what a careless supervisor would leak: a marker
in its environment (also under the names systemd and privsep use), in its memory, in a
root-only file and in an inheritable open descriptor. Each attack then runs in its own fresh
sandbox (one sandbox per item, as in production), reports what it reached, and this module
judges the report. An attack that could not run is ``ERROR``: it proves nothing, so it fails
the selftest as a leak does.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from privsep.runner.config.check_perms import targets
from privsep.runner.config.loader import Config
from privsep.runner.supervisor.settings import SupervisorSettings
from privsep.sandbox import ExitReason, Limits, SandboxSpec

PROBE = Path(__file__).with_name("probe.py")
RUN_PATH = "privsep.sandbox.entrypoints:run_path"
REPORT_PREFIX = "SELFTEST "

# Names a supervisor's environment may carry that no sandbox may inherit.
SUPERVISOR_ONLY_NAMES = (
    "PRIVSEP_SELFTEST_SECRET",
    "PRIVSEP__SUPERVISOR__CREDENTIAL",
    "CREDENTIALS_DIRECTORY",
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "LISTEN_FDS",
)
_FULL_CAPS = "0000000000000000"


@dataclass(frozen=True)
class Verdict:
    """One scorecard line: the attack, ``held``, ``LEAKED`` or ``ERROR``, and why."""

    attack: str
    title: str
    result: str
    detail: str

    @property
    def held(self) -> bool:
        return self.result == "held"


@dataclass
class Planted:
    """What the selftest planted, and where the sandboxes can aim."""

    marker: str
    digest: str
    area: Path
    secret_file: Path
    fd: int
    tcp_port: int
    abstract_name: str
    server_socket: str
    server_host: str
    server_port: str
    secret_paths: list[str] = field(default_factory=list)


class Launcher(Protocol):
    """What the battery needs of a backend: launch one spec, get a handle that ends."""

    def launch(self, spec: SandboxSpec) -> Any: ...


Judge = Callable[[dict[str, Any], Planted], tuple[bool, str]]


def _read_secrets(report: dict[str, Any], _p: Planted) -> tuple[bool, str]:
    opened = [path for path, how in report["opened"].items() if how == "READ"]
    if opened:
        return False, "opened " + ", ".join(opened)
    return True, f"all {len(report['opened'])} refused: " + ", ".join(
        f"{path} {how}" for path, how in sorted(report["opened"].items())
    )


def _environment(report: dict[str, Any], _p: Planted) -> tuple[bool, str]:
    leaked = sorted(set(report["names"]) & set(SUPERVISOR_ONLY_NAMES))
    if report["marker"] or leaked:
        what = ", ".join(leaked or ["the marker"])
        return False, f"the supervisor's environment reached the sandbox: {what}"
    return True, f"{len(report['names'])} variables, none of the supervisor's"


def _memory(report: dict[str, Any], _p: Planted) -> tuple[bool, str]:
    opened = [name for name, how in report["opened"].items() if how == "READ"]
    if opened or report["marker"]:
        return False, f"read the supervisor's /proc {opened} or found its marker in memory"
    return True, "supervisor's /proc refused; marker not in sandbox memory"


def _descriptors(report: dict[str, Any], _p: Planted) -> tuple[bool, str]:
    if report["marker"]:
        return False, f"an inherited descriptor reads the planted secret: {report['stray']}"
    if report["stray"]:
        return True, f"no secret behind the extra descriptors {report['stray']}"
    return True, "only stdin, stdout and stderr are open"


def _identity(report: dict[str, Any], _p: Planted) -> tuple[bool, str]:
    problems = []
    if 0 in report["uid"] or len(set(report["uid"])) != 1:
        problems.append(f"uids {report['uid']}")
    if 0 in report["gid"] or len(set(report["gid"])) != 1:
        problems.append(f"gids {report['gid']}")
    # Docker lists the primary gid as a supplementary group too; that grants nothing more.
    if set(report["groups"]) - {report["gid"][0]}:
        problems.append(f"groups {report['groups']}")
    for key in ("CapPrm", "CapEff", "CapAmb"):
        if report[key] != _FULL_CAPS:
            problems.append(f"{key} {report[key]}")
    if report["NoNewPrivs"] != "1":
        problems.append("NoNewPrivs is off")
    if report["Seccomp"] != "2":
        problems.append(f"seccomp mode {report['Seccomp']}")
    if problems:
        return False, "; ".join(problems)
    return True, f"uid {report['uid'][0]}, no groups, no capabilities, NoNewPrivs, seccomp"


def _all_refused(what: str) -> Judge:
    def judge(report: dict[str, Any], _p: Planted) -> tuple[bool, str]:
        worked = sorted(name for name, how in report.items() if how in ("ok", "connected"))
        if worked:
            return False, f"{what}: {', '.join(worked)} succeeded"
        return True, ", ".join(f"{name} {how}" for name, how in sorted(report.items()))

    return judge


def _processes(report: dict[str, Any], _p: Planted) -> tuple[bool, str]:
    if report["signal"] == "ok":
        return False, "the sandbox can signal the supervisor"
    seen, signal = report["visible"], report["signal"]
    return True, f"sees {seen} process(es); signalling the supervisor: {signal}"


@dataclass(frozen=True)
class Attack:
    name: str
    title: str
    judge: Judge
    args: Callable[[Planted], tuple[str, ...]] = lambda _p: ()


ATTACKS: tuple[Attack, ...] = (
    Attack(
        "read_secrets",
        "read the configured secrets and a root-only file",
        _read_secrets,
        lambda p: (*p.secret_paths, str(p.secret_file)),
    ),
    Attack(
        "environment", "inherit the supervisor's environment", _environment, lambda p: (p.digest,)
    ),
    Attack(
        "supervisor_memory",
        "read the supervisor's memory",
        _memory,
        lambda p: (str(os.getpid()), p.digest),
    ),
    Attack("descriptors", "use a stray inherited descriptor", _descriptors, lambda p: (p.digest,)),
    Attack("identity", "keep root, groups, capabilities; skip NoNewPrivs or seccomp", _identity),
    Attack("regain_root", "get root or a user namespace back", _all_refused("regained")),
    Attack(
        "ptrace", "ptrace the supervisor", _all_refused("attached"), lambda _p: (str(os.getpid()),)
    ),
    Attack("mount", "mount or remount filesystems", _all_refused("mounted")),
    Attack("tiocsti", "inject keystrokes into a terminal (TIOCSTI)", _all_refused("injected")),
    Attack("processes", "see or signal the supervisor", _processes, lambda _p: (str(os.getpid()),)),
    Attack(
        "network",
        "reach the host's network and the API server without a token",
        _all_refused("reached"),
        lambda p: (
            str(p.tcp_port),
            p.abstract_name,
            p.server_socket,
            p.server_host,
            p.server_port,
        ),
    ),
)


@contextlib.contextmanager
def planted(cfg: Config, settings: SupervisorSettings) -> Iterator[Planted]:
    """Plant the marker everywhere a supervisor holds secrets, and listeners to aim at."""
    marker = "PRIVSEP-SELFTEST-" + secrets.token_hex(16)
    area = Path(tempfile.mkdtemp(prefix="privsep-selftest-"))
    os.chmod(area, 0o755)  # noqa: S103 - the sandbox uid must traverse to its bundle and work dir
    bundle = area / "bundle"
    bundle.mkdir(mode=0o755)
    shutil.copyfile(PROBE, bundle / "probe.py")
    (bundle / "probe.py").chmod(0o644)
    # Root-only, in the bundle the sandbox reads its code from: the sandbox sees the file, and
    # only its uid (not the mount namespace) keeps it out.
    secret_file = bundle / "supervisor.key"
    fd = os.open(secret_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, marker.encode())
    os.close(fd)
    fd = os.open(secret_file, os.O_RDONLY)
    os.set_inheritable(fd, True)  # as a careless supervisor would leave it
    saved = {name: os.environ.get(name) for name in SUPERVISOR_ONLY_NAMES}
    os.environ.update(dict.fromkeys(SUPERVISOR_ONLY_NAMES, marker))
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    abstract = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        tcp.bind(("127.0.0.1", 0))
        tcp.listen(4)
        abstract_name = "privsep-selftest-" + secrets.token_hex(8)
        abstract.bind("\0" + abstract_name)
        abstract.listen(4)
        url = urlsplit(settings.server_url)
        yield Planted(
            marker=marker,
            digest=hashlib.sha256(marker.encode()).hexdigest(),
            area=area,
            secret_file=secret_file,
            fd=fd,
            tcp_port=tcp.getsockname()[1],
            abstract_name=abstract_name,
            server_socket=settings.api_socket or str(cfg.path_of("server.socket")),
            server_host=url.hostname or "",
            server_port=str(url.port or (443 if url.scheme == "https" else 80)),
            secret_paths=[t.path for t in targets(cfg) if t.probe and os.path.exists(t.path)],
        )
    finally:
        tcp.close()
        abstract.close()
        os.close(fd)
        shutil.rmtree(area, ignore_errors=True)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def report_of(output: str) -> dict[str, Any] | None:
    """The probe's ``SELFTEST {...}`` line, or None when it printed none."""
    for line in reversed(output.splitlines()):
        if line.startswith(REPORT_PREFIX):
            value = json.loads(line[len(REPORT_PREFIX) :])
            return value if isinstance(value, dict) else None
    return None


def run_battery(
    backend: Launcher,
    settings: SupervisorSettings,
    plant: Planted,
    *,
    progress: Callable[[Verdict], None] = lambda _v: None,
) -> list[Verdict]:
    """Each attack in its own fresh sandbox, as the supervisor would launch a task."""
    verdicts = []
    probe = plant.area / "bundle" / "probe.py"
    for n, attack in enumerate(ATTACKS):
        verdict = _run_one(backend, settings, plant, attack, probe, plant.area / f"work-{n}")
        progress(verdict)
        verdicts.append(verdict)
    return verdicts


def _run_one(
    backend: Launcher,
    settings: SupervisorSettings,
    plant: Planted,
    attack: Attack,
    probe: Path,
    workdir: Path,
) -> Verdict:
    spec = SandboxSpec(
        kind="task",
        entry_point=RUN_PATH,
        argv=(str(probe), attack.name, *attack.args(plant)),
        workdir=str(workdir),
        limits=Limits(wall_seconds=60),
        network="none",
        bundle_paths=(str(probe.parent),),
        hidden_paths=tuple(p for p in settings.hidden_paths if os.path.exists(p)),
    )
    try:
        handle = backend.launch(spec)
        status = handle.wait(90)
        output = handle.output().text
    except Exception as exc:
        return Verdict(attack.name, attack.title, "ERROR", f"sandbox did not start: {exc}")
    report = report_of(output)
    if status is None or report is None or "error" in report:
        why = (report or {}).get("error") or (
            f"sandbox ended {status.reason.value if status else 'late'}"
            + (f": {status.detail}" if status and status.detail else "")
        )
        return Verdict(attack.name, attack.title, "ERROR", f"the attack did not run: {why}")
    if status.reason is not ExitReason.SUCCEEDED:
        return Verdict(attack.name, attack.title, "ERROR", f"sandbox ended {status.reason.value}")
    try:
        held, detail = attack.judge(report, plant)
    except (KeyError, TypeError) as exc:
        return Verdict(attack.name, attack.title, "ERROR", f"malformed report: {exc!r}")
    return Verdict(attack.name, attack.title, "held" if held else "LEAKED", detail)
