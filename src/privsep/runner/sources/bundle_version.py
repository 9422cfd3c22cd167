"""The bundle version recorded with each parse: by default, the git commit that the workflows
folder is checked out at.

The supervisor runs as root, and the repository it looks at is written by workflow authors,
who are trusted less. So this module never runs ``git``, or anything else, on that repository.
A repository's own files can make git run commands (``core.fsmonitor``, ``core.sshCommand``,
hooks, filters: the CVE-2022-24765 class of bug), and as root that would hand the authors root.
Instead it reads the few files that name the checked-out commit, laid out as git lays them out:
``.git`` (a directory, or a ``gitdir: PATH`` file in worktrees and submodules), ``HEAD``,
``commondir``, loose refs and ``packed-refs``. It reads nothing else, and never the config.
It also ignores ``GIT_DIR`` and the rest of git's environment.

Reading files as root has its own risks, so every read is limited:

* inside a git directory no symlink is followed. Each path component is opened with
  ``O_NOFOLLOW`` relative to its parent's descriptor, and ref names are checked as git checks
  them, so ``..`` cannot climb out;
* the git directory that a ``gitdir:`` file names, and the common directory that a worktree's
  ``commondir`` names, must belong to the owner of the ``.git`` entry. A repository can point
  only at directories its own owner owns, never at, say, one of root's repositories;
* only regular files with a single link are read (a hard link to someone else's file is
  refused). They are opened non-blocking, so a FIFO cannot stall the supervisor, and only a
  few KiB of each are read (``packed-refs``: :data:`MAX_PACKED_REFS`, line by line);
* the answer must be a 40- or 64-hex commit id (a SHA-1 or a SHA-256 repository).

Anything else gives no version: the supervisor sends ``""`` and logs one line per distinct
problem, not one per scan. As git does, the search for ``.git`` walks up from the folder and
stops at a filesystem boundary.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("privsep.supervisor")

LITERAL_PREFIX = "literal:"
"""``supervisor.bundle_version = "literal:TEXT"`` records TEXT itself (a release name)."""
MAX_LENGTH = 250  # the server's ParseJobRequest.bundle_version limit

MAX_SMALL_FILE = 4096
"""``.git`` files, ``HEAD``, ``commondir`` and loose refs are one short line each."""
MAX_PACKED_REFS = 32 * 1024 * 1024
"""About 400,000 refs; a larger ``packed-refs`` gives no version rather than a long read."""
MAX_LINE = 4096
MAX_SYMREF_DEPTH = 5  # git's own limit on symbolic refs that point at symbolic refs
MAX_ASCENT = 256  # directories walked up from the folder looking for ``.git``

_OID = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")
_REF_BAD_CHAR = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]")
# Refs that live in a worktree's own git directory; every other ref is in the common one.
_PER_WORKTREE = ("refs/bisect/", "refs/worktree/", "refs/rewritten/")
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_SUBDIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


class NoVersion(Exception):
    """There is no commit to report, for an ordinary reason (no repository, no commit yet).
    The message says why, in one line."""

    level = logging.INFO


class RepoProblem(NoVersion):
    """The repository holds something git would not write, or something this module will
    not read as root. The message says what, in one line."""

    level = logging.WARNING


@dataclass(frozen=True)
class _Dir:
    fd: int
    path: str  # for messages only: every read goes through ``fd``


class BundleVersionSource:
    """Gives the bundle version for one supervisor's discovery scans, from the configured
    ``supervisor.bundle_version``, and logs each distinct problem once, not on every scan."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._last_note = ""

    def read(self, source: str) -> str:
        """The version for ``source``, which is ``git``, ``none`` or ``literal:TEXT``; the
        configuration loader has already rejected anything else."""
        if source == "none":
            return ""
        literal = source[len(LITERAL_PREFIX) :]
        if source.startswith(LITERAL_PREFIX) and 0 < len(literal) <= MAX_LENGTH:
            return literal
        if source != "git":
            raise ValueError(f"bad bundle version source {source[:60]!r}")
        try:
            version = git_head_commit(self.folder)
        except NoVersion as exc:
            self._note(exc.level, f"no bundle version for parses: {exc}")
            return ""
        self._note(logging.INFO, f"bundle version for parses: git commit {version}")
        return version

    def _note(self, level: int, message: str) -> None:
        if message != self._last_note:
            log.log(level, "%s", message)
            self._last_note = message


def git_head_commit(folder: Path) -> str:
    """The commit id checked out in the git work tree that holds ``folder``, read from the
    repository's files alone. Raises :class:`NoVersion` (or :class:`RepoProblem`)."""
    with contextlib.ExitStack() as fds:
        try:
            top, entry = _find_git_entry(folder, fds)
            git_dir = _git_dir(top, entry, fds)
            owner = os.fstat(entry.fd).st_uid
            common = _common_dir(git_dir, owner, fds)
            head = _read(git_dir, "HEAD", MAX_SMALL_FILE)
            if head is None:
                raise RepoProblem(f"{git_dir.path} has no HEAD")
            return _resolve_head(head, git_dir, common)
        except UnicodeDecodeError:
            raise RepoProblem(f"{folder}: a git file is not UTF-8 text") from None
        except OSError as exc:  # an I/O error, or a race with a concurrent git command
            raise RepoProblem(f"{folder}: cannot read the git repository ({exc})") from None


# --- finding the git directory ------------------------------------------------------------


def _find_git_entry(folder: Path, fds: contextlib.ExitStack) -> tuple[_Dir, _Dir]:
    """The work tree's top directory and its ``.git`` entry, searched for from ``folder`` up
    to ``/`` or to a filesystem boundary, as git searches."""
    path = os.path.realpath(folder)
    try:
        here = _Dir(_keep(fds, os.open(path, _DIR_FLAGS)), path)
    except OSError as exc:
        raise NoVersion(f"{folder} cannot be opened ({exc.strerror})") from None
    for _ in range(MAX_ASCENT):
        try:
            fd = os.open(".git", _FILE_FLAGS, dir_fd=here.fd)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise _refused(here, ".git", exc) from None
        else:
            return here, _Dir(_keep(fds, fd), os.path.join(here.path, ".git"))
        parent = _Dir(_keep(fds, os.open("..", _DIR_FLAGS, dir_fd=here.fd)), "")
        st_here, st_parent = os.fstat(here.fd), os.fstat(parent.fd)
        if st_here.st_dev != st_parent.st_dev or st_here.st_ino == st_parent.st_ino:
            break
        here = _Dir(parent.fd, os.path.dirname(here.path))
    raise NoVersion(f"no git work tree holds {folder}")


def _git_dir(top: _Dir, entry: _Dir, fds: contextlib.ExitStack) -> _Dir:
    """The git directory: ``.git`` itself, or the directory its ``gitdir:`` line names
    (worktrees, submodules), which must belong to the ``.git`` file's owner."""
    st = os.fstat(entry.fd)
    if stat.S_ISDIR(st.st_mode):
        return entry
    if not stat.S_ISREG(st.st_mode):
        raise RepoProblem(f"{entry.path} is neither a directory nor a file")
    text = _one_line(_read_open(entry, MAX_SMALL_FILE), entry.path)
    if not text.startswith("gitdir: ") or not text[len("gitdir: ") :].strip():
        raise RepoProblem(f"{entry.path} is a file without a 'gitdir: PATH' line")
    return _open_owned_dir(top, text[len("gitdir: ") :].strip(), st.st_uid, entry.path, fds)


def _common_dir(git_dir: _Dir, owner: int, fds: contextlib.ExitStack) -> _Dir:
    """Where the shared refs are: the directory a worktree's ``commondir`` file names
    (relative to its git directory), or the git directory itself."""
    data = _read(git_dir, "commondir", MAX_SMALL_FILE)
    if data is None:
        return git_dir
    where = os.path.join(git_dir.path, "commondir")
    target = _one_line(data, where)
    if not target:
        raise RepoProblem(f"{where} is empty")
    return _open_owned_dir(git_dir, target, owner, where, fds)


def _open_owned_dir(
    base: _Dir, target: str, owner: int, named_by: str, fds: contextlib.ExitStack
) -> _Dir:
    """Open a directory a repository file names (absolute, or relative to ``base``). Symlinks
    on the way are followed, as git follows them, but the directory reached must belong to
    ``owner``: a repository may not send root to read someone else's."""
    path = os.path.normpath(os.path.join(base.path, target))
    try:
        fd = _keep(fds, os.open(target, _DIR_FLAGS, dir_fd=base.fd))
    except OSError as exc:
        raise RepoProblem(
            f"{named_by} names {path}, which cannot be opened ({exc.strerror})"
        ) from None
    found = os.fstat(fd).st_uid
    if found != owner:
        raise RepoProblem(
            f"{named_by} names {path}, owned by uid {found}, not by uid {owner} who owns "
            "the repository: not read"
        )
    return _Dir(fd, path)


# --- HEAD and refs --------------------------------------------------------------------------


def _resolve_head(head: bytes, git_dir: _Dir, common: _Dir) -> str:
    """Follow ``HEAD`` through symbolic refs (loose files, then ``packed-refs``) to a commit."""
    name, data = "HEAD", head
    for _ in range(MAX_SYMREF_DEPTH + 1):
        text = _one_line(data, os.path.join(git_dir.path, name))
        if not text.startswith("ref:"):
            if _OID.fullmatch(text) and text.strip("0"):
                return text
            raise RepoProblem(f"{git_dir.path}: {name} holds neither a commit id nor a ref")
        ref = text[len("ref:") :].strip()
        if ref == "refs/heads/.invalid":
            raise RepoProblem(f"{git_dir.path} keeps its refs in a reftable, which is not read")
        if not valid_ref_name(ref):
            raise RepoProblem(f"{git_dir.path}: {name} names an invalid ref {ref[:100]!r}")
        loose = _read(git_dir if ref.startswith(_PER_WORKTREE) else common, ref, MAX_SMALL_FILE)
        if loose is None:
            packed = _packed_ref(common, ref)
            if packed is None:
                raise NoVersion(f"{ref} in {common.path} has no commit yet")
            return packed
        name, data = ref, loose
    raise RepoProblem(f"{git_dir.path}: symbolic refs nest more than {MAX_SYMREF_DEPTH} deep")


def valid_ref_name(name: str) -> bool:
    """Whether ``name`` is a ref git could have written under ``refs/`` (the rules of
    ``git check-ref-format``). Anything else, ``..`` above all, is never opened."""
    if not name.startswith("refs/") or len(name) > 1024:
        return False
    if ".." in name or "@{" in name or name.endswith("."):
        return False
    return all(
        part and not part.startswith(".") and not part.endswith(".lock") for part in name.split("/")
    ) and not _REF_BAD_CHAR.search(name)


def _packed_ref(common: _Dir, ref: str) -> str | None:
    """The commit ``packed-refs`` gives ``ref``, or None. Read line by line, bounded."""
    where = os.path.join(common.path, "packed-refs")
    fd = _open_file(common, "packed-refs")
    if fd is None:
        return None
    with os.fdopen(fd, "rb") as fh:
        _check_file(os.fstat(fd), where, MAX_PACKED_REFS)
        suffix = b" " + ref.encode() + b"\n"
        total = 0
        while line := fh.readline(MAX_LINE + 1):
            total += len(line)
            if total > MAX_PACKED_REFS or len(line) > MAX_LINE:
                raise RepoProblem(f"{where} is too large or has an overlong line")
            if not line.endswith(b"\n"):  # the last line, unterminated
                line += b"\n"
            if line.startswith((b"#", b"^")) or not line.endswith(suffix):
                continue
            oid = line[: -len(suffix)].decode("ascii", "replace")
            if _OID.fullmatch(oid):
                return oid
            raise RepoProblem(f"{where}: the line for {ref} has no commit id")
    return None


# --- reading files as root ----------------------------------------------------------------


def _read(base: _Dir, relpath: str, limit: int) -> bytes | None:
    """A small file under ``base``, or None when it does not exist."""
    fd = _open_file(base, relpath)
    if fd is None:
        return None
    return _read_open(_Dir(fd, os.path.join(base.path, relpath)), limit, close=True)


def _open_file(base: _Dir, relpath: str) -> int | None:
    """Open ``relpath`` under ``base`` one component at a time, never following a symlink.
    None when it does not exist."""
    *dirs, name = relpath.split("/")
    fd = base.fd
    try:
        for i, part in enumerate(dirs):
            try:
                nxt = os.open(part, _SUBDIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                return None
            except OSError as exc:
                raise _refused(_Dir(fd, os.path.join(base.path, *dirs[:i])), part, exc) from None
            if fd != base.fd:
                os.close(fd)
            fd = nxt
        try:
            return os.open(name, _FILE_FLAGS, dir_fd=fd)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise _refused(_Dir(fd, os.path.join(base.path, *dirs)), name, exc) from None
    finally:
        if fd != base.fd:
            os.close(fd)


def _read_open(file: _Dir, limit: int, *, close: bool = False) -> bytes:
    """Up to ``limit`` bytes of an open file that must be a regular file with one link."""
    try:
        _check_file(os.fstat(file.fd), file.path, limit)
        data = os.read(file.fd, limit + 1)
        if len(data) > limit:
            raise RepoProblem(f"{file.path} is larger than {limit} bytes")
        return data
    finally:
        if close:
            os.close(file.fd)


def _check_file(st: os.stat_result, path: str, limit: int) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise RepoProblem(f"{path} is not a regular file")
    if st.st_nlink != 1:
        raise RepoProblem(f"{path} has {st.st_nlink} hard links, not 1: not read")
    if st.st_size > limit:
        raise RepoProblem(f"{path} is larger than {limit} bytes")


def _one_line(data: bytes, path: str) -> str:
    """The single line of a git file, without its line end."""
    text = data.decode("utf-8").rstrip("\r\n")
    if "\n" in text or "\x00" in text:
        raise RepoProblem(f"{path} holds more than one line")
    return text.strip()


def _refused(parent: _Dir, name: str, exc: OSError) -> RepoProblem:
    """A one-line reason why ``name`` in ``parent`` was not opened."""
    path = os.path.join(parent.path, name)
    with contextlib.suppress(OSError):
        if stat.S_ISLNK(os.stat(name, dir_fd=parent.fd, follow_symlinks=False).st_mode):
            return RepoProblem(f"{path} is a symlink: not followed")
    if exc.errno == errno.ENOTDIR:
        return RepoProblem(f"{path} is not a directory")
    return RepoProblem(f"cannot open {path} ({exc.strerror})")


def _keep(fds: contextlib.ExitStack, fd: int) -> int:
    fds.callback(os.close, fd)
    return fd
