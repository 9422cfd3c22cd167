"""Permission-checked access to files that hold long-lived secrets.

Every check is made on an open descriptor (``O_NOFOLLOW|O_NONBLOCK``, then ``fstat``), never on
a path that could be swapped between the check and the read. The rules are OpenSSH's
``safe_path`` rules, made stricter where a secret is at stake:

* the file is a regular file with exactly one link, not a symlink;
* it is owned by the running user or by root;
* it has no group or other permission bit;
* every directory above it, up to ``/``, is owned by the running user or root and is not
  writable by group or others, unless it is root-owned and sticky (like ``/tmp``).

Each problem comes back as a :class:`Finding` that names the path, the problem and the exact
command that fixes it, so a person can act on it without reading this module.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pwd
import shlex
import stat
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass

# Secrets are small. A credential file of more than this is almost certainly the wrong file.
MAX_SECRET_BYTES = 1 << 20

_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY


@dataclass(frozen=True)
class Finding:
    """One violation: what is wrong with which path, and the command that fixes it."""

    path: str
    problem: str
    fix: str

    def __str__(self) -> str:
        return f"{self.path}: {self.problem} (fix: {self.fix})"

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


class InsecureFileError(Exception):
    """A secret-bearing file failed the permission check; nothing was read from it."""

    def __init__(self, findings: Iterable[Finding]) -> None:
        self.findings = list(findings)
        super().__init__("; ".join(str(f) for f in self.findings))


def _q(path: str) -> str:
    return shlex.quote(path)


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _allowed_owners() -> tuple[int, int]:
    return (os.geteuid(), 0)


def _expected_owner() -> str:
    euid = os.geteuid()
    return "root" if euid == 0 else f"{_user_name(euid)} or root"


def check_parents(path: str, what: str = "the secret") -> list[Finding]:
    """Check every directory above ``path`` up to ``/``: nobody but its owner (or root) may
    be able to replace ``what`` (named in the findings).

    The directories are resolved (``realpath``) first, the way OpenSSH does, so a symlinked
    ``/var/run`` is judged by what it points at.
    """
    findings: list[Finding] = []
    directory = os.path.realpath(os.path.dirname(os.path.abspath(path)))
    owners = _allowed_owners()
    while True:
        try:
            st = os.stat(directory)
        except OSError as exc:
            findings.append(
                Finding(
                    directory,
                    f"cannot stat parent directory: {exc.strerror}",
                    f"ls -ld {_q(directory)}",
                )
            )
            break
        sticky_root = st.st_uid == 0 and bool(st.st_mode & stat.S_ISVTX)
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not sticky_root:
            findings.append(
                Finding(
                    directory,
                    f"parent directory is writable by group or others (mode "
                    f"{stat.S_IMODE(st.st_mode):04o}): they could replace {what}",
                    f"chmod go-w {_q(directory)}",
                )
            )
        if st.st_uid not in owners:
            findings.append(
                Finding(
                    directory,
                    f"parent directory is owned by {_user_name(st.st_uid)}, not by "
                    f"{_expected_owner()}: that user could replace {what}",
                    f"chown {_user_name(os.geteuid())} {_q(directory)}",
                )
            )
        parent = os.path.dirname(directory)
        if parent == directory:
            break
        directory = parent
    return findings


def check_not_replaceable(path: str, what: str) -> list[Finding]:
    """Findings for a file that root trusts without it being a secret: the configuration file
    (it names commands that root runs) and the executables its ``_cmd`` settings run.

    Anyone may read such a file, but whoever can change it, or a directory above it, owns the
    host the next time it is read. A symlink is allowed (``/usr/bin/python3`` is one) and is
    judged twice: the directories above the link, and the file it resolves to with its own
    directories. Raises ``FileNotFoundError`` when the file is absent.
    """
    findings = check_parents(path, what)
    real = os.path.realpath(path)
    st = os.stat(real)
    if not stat.S_ISREG(st.st_mode):
        return [*findings, Finding(real, "is not a regular file", f"ls -l {_q(real)}")]
    if st.st_uid not in _allowed_owners():
        findings.append(
            Finding(
                real,
                f"is owned by {_user_name(st.st_uid)}, not by {_expected_owner()}: "
                f"that user could change {what}",
                f"chown {_user_name(os.geteuid())} {_q(real)}",
            )
        )
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        findings.append(
            Finding(
                real,
                f"is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o}): "
                f"they could change {what}",
                f"chmod go-w {_q(real)}",
            )
        )
    if real != os.path.abspath(path):
        seen = {f.path for f in findings}
        findings += [f for f in check_parents(real, what) if f.path not in seen]
    return findings


def _owner_findings(path: str, st: os.stat_result) -> list[Finding]:
    """A secret (file or directory) owned by anyone but us or root: that user could read or
    swap it."""
    if st.st_uid in _allowed_owners():
        return []
    return [
        Finding(
            path,
            f"is owned by {_user_name(st.st_uid)}, not by {_expected_owner()}",
            f"chown {_user_name(os.geteuid())} {_q(path)}",
        )
    ]


def _check_fstat(path: str, st: os.stat_result) -> list[Finding]:
    findings: list[Finding] = []
    if not stat.S_ISREG(st.st_mode):
        what = (
            "a directory"
            if stat.S_ISDIR(st.st_mode)
            else ("a FIFO" if stat.S_ISFIFO(st.st_mode) else "not a regular file")
        )
        return [
            Finding(
                path,
                f"is {what}, not a regular file",
                f"mv {_q(path)} {_q(path + '.bad')}  # then put the real file there",
            )
        ]
    if st.st_nlink > 1:
        findings.append(
            Finding(
                path,
                f"has {st.st_nlink} hard links: another name can reach the secret",
                f"cp -p {_q(path)} {_q(path + '.new')} && mv -f {_q(path + '.new')} {_q(path)}",
            )
        )
    findings += _owner_findings(path, st)
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        findings.append(
            Finding(
                path,
                f"has mode {mode:04o}: group or others have access",
                f"chmod {0o600 if mode & 0o200 else 0o400:o} {_q(path)}",
            )
        )
    return findings


def _open_nofollow(path: str) -> int:
    """Open ``path`` for reading without following a final symlink or blocking on a FIFO."""
    try:
        return os.open(path, _OPEN_FLAGS)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise InsecureFileError(
                [
                    Finding(
                        path,
                        "is a symbolic link; secrets are read only from the file itself",
                        f'cp --remove-destination "$(readlink -f {_q(path)})" {_q(path)}',
                    )
                ]
            ) from None
        raise


def check_secret_file(path: str) -> list[Finding]:
    """All findings for one secret-bearing file. Raises ``FileNotFoundError`` if it is absent."""
    try:
        fd = _open_nofollow(path)
    except InsecureFileError as exc:
        return exc.findings + check_parents(path)
    try:
        findings = _check_fstat(path, os.fstat(fd))
    finally:
        os.close(fd)
    return findings + check_parents(path)


def read_secret_file(path: str) -> bytes:
    """Read a long-lived secret, refusing any file that fails the permission check.

    This is the only way privsep reads a credential or key: the checks and the read use the
    same descriptor, so the file cannot be swapped for a symlink or another file in between.
    """
    fd = _open_nofollow(path)
    try:
        findings = _check_fstat(path, os.fstat(fd)) + check_parents(path)
        if findings:
            raise InsecureFileError(findings)
        chunks: list[bytes] = []
        size = 0
        while chunk := os.read(fd, 65536):
            size += len(chunk)
            if size > MAX_SECRET_BYTES:
                raise InsecureFileError(
                    [
                        Finding(
                            path,
                            f"is larger than {MAX_SECRET_BYTES} bytes: not a credential",
                            f"ls -l {_q(path)}  # point the configuration at the right file",
                        )
                    ]
                )
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def check_secret_dir(path: str, *, forbidden: int = 0o077) -> list[Finding]:
    """Findings for a directory that holds secrets (a key ring) or secret-adjacent state.

    The directory itself must be owned by us or root, not a symlink, and have none of the
    ``forbidden`` mode bits; its parents follow the same rules as a secret file's.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            kind = "symbolic link" if os.path.islink(path) else "file"
            return [
                Finding(
                    path,
                    f"is a {kind}, not a directory",
                    f"mv {_q(path)} {_q(path + '.bad')} && mkdir -m 700 {_q(path)}",
                )
            ]
        raise
    try:
        st = os.fstat(fd)
    finally:
        os.close(fd)
    findings: list[Finding] = []
    findings += _owner_findings(path, st)
    mode = stat.S_IMODE(st.st_mode)
    if mode & forbidden:
        want = mode & ~forbidden & 0o777
        findings.append(
            Finding(
                path,
                f"directory has mode {mode:04o}: others have access",
                f"chmod {want:o} {_q(path)}",
            )
        )
    return findings + check_parents(path)


def write_private_file(path: str, data: bytes, *, mode: int = 0o600) -> None:
    """Create ``path`` holding ``data``, never replacing anything that is already there.

    The parent directory is created at 0700 when missing. ``O_CREAT|O_EXCL|O_NOFOLLOW`` means
    an existing file or a planted symlink makes this fail rather than be overwritten.
    """
    parent = os.path.dirname(os.path.abspath(path))
    make_private_dir(parent)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)  # the umask may have taken bits away; set exactly what we mean
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(path)
        raise
    os.close(fd)


def temporary_copy(path: str, data: bytes) -> str:
    """Write ``data`` to a new 0600 file beside ``path``, to be renamed over it with
    :func:`rename_over`, and return its name. The name starts with a dot, so scans of the
    directory skip it; nothing is left behind if writing fails."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", dir=directory)
    with _removed_on_failure(tmp), os.fdopen(fd, "wb") as f:
        f.write(data)
    return tmp


def rename_over(tmp: str, path: str, finish: Callable[[int], None] | None = None) -> None:
    """Make the finished file ``tmp`` appear as ``path`` in one rename, so a reader sees the
    old file or the new one, never part of one. ``finish(fd)`` runs on ``tmp`` first (to set
    its owner or mode, or to sync it); ``tmp`` is removed if that or the rename fails."""
    with _removed_on_failure(tmp):
        if finish is not None:
            fd = os.open(tmp, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                finish(fd)
            finally:
                os.close(fd)
        os.rename(tmp, path)


@contextlib.contextmanager
def _removed_on_failure(tmp: str) -> Iterator[None]:
    try:
        yield
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def make_private_dir(path: str, mode: int = 0o700) -> None:
    """Create ``path`` (and missing parents) at ``mode``; an existing directory is left as is."""
    if os.path.isdir(path):
        return
    parent = os.path.dirname(path)
    if parent and parent != path:
        make_private_dir(parent, mode)
    try:
        os.mkdir(path, mode)
    except FileExistsError:
        return
    os.chmod(path, mode)
