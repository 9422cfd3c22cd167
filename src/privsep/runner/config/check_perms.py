"""``runner check-perms``: every secret-bearing path the configuration names, checked twice.

First from our side: the static rules of :mod:`privsep.secrets.files`, on open descriptors.
Then from the attacker's side: a forked child drops to the sandbox uid and tries to open each
path. Both must pass. The server and the supervisor run the same check at start
(:func:`enforce_at_start`) and refuse to start on a violation.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shlex
import stat
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

from privsep.runner.config.loader import Config
from privsep.runner.config.schema import OPTIONS
from privsep.sandbox.privdrop import PrivilegeDropError, drop_privileges
from privsep.secrets.files import (
    Finding,
    check_not_replaceable,
    check_parents,
    check_secret_dir,
    check_secret_file,
)

log = logging.getLogger("privsep.check_perms")

# Exit statuses: 0 clean, 1 violation, 2 usage or configuration error (raised by the CLI).
EXIT_CLEAN = 0
EXIT_VIOLATION = 1

# What group and others may not have on directories we keep state in. The runtime directory
# may be traversed (sandboxes reach their own socket directories below it), never written.
_STATE_DIR_FORBIDDEN = 0o027
_RUNTIME_DIR_FORBIDDEN = 0o022


@dataclass(frozen=True)
class Target:
    """One path to check and how: a secret file, a secret directory or a state directory."""

    path: str
    what: str  # human name: "supervisor.credential", "config file", ...
    kind: str  # "file", "dir", "state" or "token" (a refresher's shared file)
    forbidden: int = 0o077
    probe: bool = True  # must the sandbox uid be unable to open it?


@dataclass
class Report:
    findings: list[Finding] = field(default_factory=list)
    checked: list[str] = field(default_factory=list)
    absent: list[str] = field(default_factory=list)
    probe_uid: int | None = None
    probe_note: str = ""

    @property
    def clean(self) -> bool:
        return not self.findings


def targets(cfg: Config, component: str = "") -> list[Target]:
    """Every secret-bearing path the effective configuration names, for ``component``.

    A supervisor behind a token refresher (``supervisor.session_token_file``) never reads
    ``supervisor.credential``: its path is not even resolved, and the token file is checked
    from the reader's side instead. ``runner token-refresher`` (``component``
    ``"token-refresher"``) is the one that holds the key, or the keytab in Kerberos mode.
    """
    out: list[Target] = []
    if cfg.secrets_in_file:
        out.append(
            Target(str(cfg.path), f"config file (holds {', '.join(cfg.secrets_in_file)})", "file")
        )
    refresher = component == "token-refresher"
    behind_refresher = bool(cfg.get("supervisor.session_token_file")) and not refresher
    if behind_refresher:
        out.append(
            Target(
                str(cfg.path_of("supervisor.session_token_file")),
                "supervisor.session_token_file",
                "token",
            )
        )
    kerberos = cfg.get("token_refresher.mode") == "kerberos"
    if refresher and kerberos and cfg.get("token_refresher.keytab"):
        out.append(Target(str(cfg.path_of("token_refresher.keytab")), "keytab", "file"))
    credential_dirs: set[str] = set()
    for opt in OPTIONS:
        if opt.name == "supervisor.credential" and (behind_refresher or (refresher and kerberos)):
            continue
        if opt.secret_path:
            path = str(cfg.path_of(opt.name))
            out.append(Target(path, opt.name, "dir" if opt.directory else "file"))
            if cfg.systemd_credential(opt.name) is not None:
                credential_dirs.add(os.path.dirname(path))
    # systemd makes the credentials directory 0500 and each file 0400, root's for a root
    # service: anything looser there means something other than systemd put it in place.
    for directory in sorted(credential_dirs):
        out.append(Target(directory, "systemd credentials directory", "state", 0o077))
    for name, path in cfg.secret_files.items():
        out.append(Target(os.path.abspath(path), f"{name} (_file)", "file"))
    out.append(
        Target(str(cfg.path_of("core.state_dir")), "core.state_dir", "state", _STATE_DIR_FORBIDDEN)
    )
    out.append(
        Target(
            str(cfg.path_of("core.runtime_dir")),
            "core.runtime_dir",
            "state",
            _RUNTIME_DIR_FORBIDDEN,
            probe=False,
        )
    )
    return out


def _static(target: Target, report: Report) -> list[str]:
    """Check one target; return the paths (it and, for a key ring, its keys) to probe."""
    if target.kind == "token":
        return [target.path] if _check_one(target.path, report, check_token_file) else []
    if target.kind == "file":
        return [target.path] if _check_one(target.path, report, check_secret_file) else []
    if not _check_one(
        target.path, report, lambda p: check_secret_dir(p, forbidden=target.forbidden)
    ):
        return []
    paths = [target.path]
    if target.kind == "dir" and os.path.isdir(target.path) and not os.path.islink(target.path):
        try:
            entries = sorted(os.scandir(target.path), key=lambda e: e.name)
        except OSError as exc:
            report.findings.append(
                Finding(
                    target.path,
                    f"cannot list: {exc.strerror}",
                    f"ls -ld {shlex.quote(target.path)}",
                )
            )
            return paths
        for entry in entries:
            if entry.name.endswith(".pub"):
                continue  # public halves of key pairs are meant to be shared
            report.checked.append(entry.path)
            if _check_one(entry.path, report, check_secret_file):
                paths.append(entry.path)
    return paths


def _check_one(path: str, report: Report, check: Callable[[str], list[Finding]]) -> bool:
    """Run one check; turn an unopenable path into a finding. False if nothing to probe."""
    try:
        report.findings += check(path)
    except FileNotFoundError:
        report.absent.append(path)
        return False
    except OSError as exc:
        what = (
            "is a socket or device, not a regular file"
            if exc.errno == errno.ENXIO
            else (f"cannot open: {exc.strerror}")
        )
        report.findings.append(Finding(path, what, f"ls -ld {shlex.quote(path)}"))
        return False
    return True


def _read_only_mount(path: str) -> bool:
    """Whether ``path`` is on a mount that is read-only here (nobody here can change it)."""
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _replaceable(st: os.stat_result, path: str) -> bool:
    """Whether others than the owner could rename entries of directory ``path`` away."""
    sticky_root = st.st_uid == 0 and bool(st.st_mode & stat.S_ISVTX)
    return bool(st.st_mode & 0o022) and not sticky_root and not _read_only_mount(path)


def check_token_file(path: str) -> list[Finding]:
    """A refresher's shared token file, judged by the supervisor that reads it: readable by
    it (as owner's group, or as root), by nobody else, and neither it nor its directory
    changeable by the supervisor's user or by others. The refresher's user owns both.
    ``FileNotFoundError`` when the file is not there yet (the refresher writes it).

    A directory on a mount that is read-only here (a Kubernetes pod's shared emptyDir, mounted
    read-only into the supervisor's container) cannot be changed from here, whatever its mode.
    """
    q = shlex.quote
    directory = os.path.dirname(os.path.abspath(path))
    euid = os.geteuid()
    findings: list[Finding] = []
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        dst = os.fstat(dfd)
    finally:
        os.close(dfd)
    if _replaceable(dst, directory):
        findings.append(
            Finding(
                directory,
                f"token directory has mode {stat.S_IMODE(dst.st_mode):04o}: group or others "
                "could replace the token",
                f"chmod go-w {q(directory)}",
            )
        )
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
    finally:
        os.close(fd)
    mode = stat.S_IMODE(st.st_mode)
    if not stat.S_ISREG(st.st_mode):
        findings.append(Finding(path, "is not a regular file", f"ls -l {q(path)}"))
    if mode & 0o027:
        findings.append(
            Finding(
                path,
                f"has mode {mode:04o}: others can read it or the group can write it",
                f"chmod 640 {q(path)}",
            )
        )
    for what, owner in (("token file", st.st_uid), ("token directory", dst.st_uid)):
        if euid != 0 and owner == euid:
            findings.append(
                Finding(
                    path if what == "token file" else directory,
                    f"{what} is owned by the supervisor's own user: it could write the token; "
                    "the refresher's user should own it",
                    "run runner token-refresher as its own user, and remove the file",
                )
            )
    if (
        euid != 0
        and st.st_uid != euid
        and not (mode & 0o040 and st.st_gid in (os.getegid(), *os.getgroups()))
    ):
        findings.append(
            Finding(
                path,
                f"the supervisor (uid {euid}) cannot read it",
                "set token_refresher.group to the supervisor's group",
            )
        )
    seen = {f.path for f in findings}
    for finding in check_parents(directory, "the token directory"):
        if finding.path not in seen and not _read_only_mount(finding.path):
            findings.append(finding)
    return findings


def probe_as_sandbox(paths: list[str], uid: int) -> list[str]:
    """Fork, drop to ``uid``, try to open each path; return the ones that opened.

    This proves the rule from the attacker's side: modes can look right while an ACL, a
    group or a forgotten bind mount still lets the sandbox read a secret.
    """
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns
        code = 0
        try:
            os.close(read_fd)
            drop_privileges(uid, uid)
            opened = []
            for path in paths:
                try:
                    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
                except OSError:
                    continue
                os.close(fd)
                opened.append(path)
            os.write(write_fd, json.dumps(opened).encode())
        except PrivilegeDropError as exc:
            os.write(write_fd, json.dumps({"error": str(exc)}).encode())
        except BaseException:
            code = 3
        finally:
            os._exit(code)
    os.close(write_fd)
    chunks = []
    while chunk := os.read(read_fd, 65536):
        chunks.append(chunk)
    os.close(read_fd)
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0 or not chunks:
        raise PrivilegeDropError(f"the sandbox-uid probe child failed (status {status})")
    result = json.loads(b"".join(chunks))
    if isinstance(result, dict):
        raise PrivilegeDropError(result["error"])
    return [str(p) for p in result]


def check_permissions(cfg: Config, component: str = "") -> Report:
    """Run the static checks and the sandbox-uid probe over every target."""
    report = Report()
    to_probe: list[str] = []
    for target in targets(cfg, component):
        report.checked.append(target.path)
        paths = _static(target, report)
        if target.probe:
            to_probe += paths
    uid = int(cfg.get("sandbox.uid_first"))
    if os.geteuid() != 0:
        report.probe_note = (
            "sandbox-uid probe not run: only root can switch to the sandbox "
            "uid; run check-perms as root to prove the sandbox cannot read"
        )
    elif to_probe:
        report.probe_uid = uid
        for path in probe_as_sandbox(to_probe, uid):
            kind = "directory" if stat.S_ISDIR(os.stat(path).st_mode) else "file"
            report.findings.append(
                Finding(
                    path,
                    f"the sandbox uid {uid} can open this {kind}",
                    f"chmod go-rwx {shlex.quote(path)}",
                )
            )
    _check_bundle(cfg, report)
    _check_trusted(cfg, report)
    return report


def _check_trusted(cfg: Config, report: Report) -> None:
    """The configuration file and every executable a ``_cmd`` names: root runs what they say.

    A file holding a secret is already held to the secret rules above; this adds the
    configuration file that holds none (it may be world-readable, never writable) and the
    commands. A command that cannot be found is left to the loader, which refuses it by name
    when it would run.
    """
    seen = {f.path for f in report.findings}
    trusted: list[tuple[str, str]] = []
    if cfg.file_exists and not cfg.secrets_in_file:
        trusted.append((str(cfg.path), "the configuration file (it names commands root runs)"))
    for where, command in sorted(cfg.commands.items()):
        executable = _executable_of(command)
        if executable:
            trusted.append((executable, f"the command that {where} runs"))
    for path, what in trusted:
        report.checked.append(path)
        try:
            found = check_not_replaceable(path, what)
        except FileNotFoundError:
            report.absent.append(path)
            continue
        except OSError as exc:
            found = [Finding(path, f"cannot stat: {exc.strerror}", f"ls -l {shlex.quote(path)}")]
        for finding in found:
            if finding.path not in seen:
                seen.add(finding.path)
                report.findings.append(finding)


def _executable_of(command: str) -> str | None:
    """The file a ``_cmd`` executes: its first word, looked up in ``PATH`` as ``exec`` would."""
    import shutil

    try:
        argv = shlex.split(command)
    except ValueError:
        return None
    if not argv:
        return None
    if "/" in argv[0]:
        return os.path.abspath(argv[0])
    return shutil.which(argv[0])


def _check_bundle(cfg: Config, report: Report) -> None:
    """The workflows folder: nobody but its owner can swap it for another, and what
    sandboxes must read (the workflow files), they can read.

    Discovery reads, as root, only files that lie inside the folder's real path, but that
    path is looked up at every scan: whoever can write a directory above the folder could
    replace it with a link to ``/etc`` and have root copy what is there to where sandboxes
    read code. (Writing inside the folder is what workflow authors do, and is fine.) A
    definition file the sandbox uid cannot read would fail every parse with a confusing
    import error; say so here, with the fix.
    """
    from privsep.sandbox.view import unreadable_by_sandbox

    bundle = cfg.path_of("core.workflows_dir")
    if not bundle.is_dir():
        return
    report.checked.append(str(bundle))
    seen: set[str] = set()
    for path in (str(bundle), os.path.realpath(bundle)):  # the link, and what it points at
        for finding in check_parents(path, what="the workflows folder"):
            if finding.path not in seen:
                seen.add(finding.path)
                report.findings.append(finding)
    for item in unreadable_by_sandbox([str(bundle)]):
        report.findings.append(
            Finding(item.path, f"sandboxes cannot read this workflow path ({item.why})", item.fix)
        )


def format_text(report: Report) -> str:
    lines = [f"{f.path}: {f.problem}; fix: {f.fix}" for f in report.findings]
    summary = (
        f"check-perms: {len(report.checked)} paths checked, "
        f"{len(report.findings)} problem{'s' if len(report.findings) != 1 else ''}"
    )
    if report.absent:
        summary += f", {len(report.absent)} not present yet ({', '.join(report.absent)})"
    if report.probe_uid is not None:
        summary += (
            f"; sandbox uid {report.probe_uid} could open none"
            if not any("sandbox uid" in f.problem for f in report.findings)
            else ""
        )
    lines.append(summary)
    if report.probe_note:
        lines.append(f"check-perms: note: {report.probe_note}")
    return "\n".join(lines)


def format_json(report: Report) -> str:
    return json.dumps(
        {
            "ok": report.clean,
            "findings": [f.as_dict() for f in report.findings],
            "checked": report.checked,
            "absent": report.absent,
            "probe_uid": report.probe_uid,
            "probe_note": report.probe_note,
        },
        indent=2,
    )


def run_check_perms(cfg: Config, *, as_json: bool = False, component: str = "") -> int:
    report = check_permissions(cfg, component)
    print(format_json(report) if as_json else format_text(report))
    return EXIT_CLEAN if report.clean else EXIT_VIOLATION


class PermissionViolation(Exception):
    """Raised by :func:`enforce_at_start` when strict mode finds a violation."""

    def __init__(self, report: Report) -> None:
        self.report = report
        super().__init__(format_text(report))


def enforce_at_start(cfg: Config, component: str) -> Report:
    """The start-up check shared by ``runner server`` and ``runner supervisor``.

    Strict by default: any violation raises :class:`PermissionViolation`. With
    ``core.strict_permissions = false`` (development only) violations are logged loudly and
    the component starts anyway.
    """
    report = check_permissions(cfg, component)
    if report.clean:
        return report
    if bool(cfg.get("core.strict_permissions")):
        raise PermissionViolation(report)
    banner = "!" * 72
    print(
        f"{banner}\nWARNING: {component} is starting with {len(report.findings)} permission "
        f"violation(s) because core.strict_permissions = false.\nThis is for development "
        f"only: secrets on this host may be readable by others.\n{format_text(report)}\n"
        f"{banner}",
        file=sys.stderr,
    )
    log.warning(
        "%s started with %d permission violations (strict_permissions is off)",
        component,
        len(report.findings),
    )
    return report
