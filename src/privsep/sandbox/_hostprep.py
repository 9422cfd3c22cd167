"""What the supervisor prepares on the host for one sandbox's uid, and takes back after it.

Both backends hand a sandbox the same things of the host: a work dir only its uid may enter,
the credential socket only its uid may connect to, and a log file only the supervisor reads.
They must be handed over, and the work dir handed back, the same way whichever backend runs the
sandbox, or one backend's next holder of a uid could reach its previous holder's files.
"""

from __future__ import annotations

import contextlib
import os
import stat

from privsep.sandbox.errors import SandboxLaunchError


def prepare_workdir(path: str, uid: int, gid: int, *, chown: bool) -> str:
    """Create (or adopt) the work dir: a real directory, mode 0700, owned by the sandbox uid."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise SandboxLaunchError(f"work dir {path} is not a directory (or is a symlink)")
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        if chown:
            os.fchown(fd, uid, gid)
        os.fchmod(fd, 0o700)
    finally:
        os.close(fd)
    return os.path.realpath(path)


def prepare_socket(path: str | None, uid: int, gid: int, *, chown: bool) -> str | None:
    """Check the credential socket and let the sandbox uid (only) connect to it."""
    if path is None:
        return None
    st = os.lstat(path)
    if not stat.S_ISSOCK(st.st_mode):
        raise SandboxLaunchError(f"credential socket {path} is not a unix socket")
    if chown:
        os.chown(path, uid, gid, follow_symlinks=False)
        os.chmod(path, 0o600)  # lstat said socket, not symlink: nothing else to follow
    return os.path.realpath(path)


def release_workdir(path: str) -> None:
    """After the sandbox: root-owned 0700 again, so the uid's next holder cannot get in."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.fchown(fd, 0, 0)
        os.fchmod(fd, 0o700)
    except OSError:
        pass
    finally:
        os.close(fd)


def open_log(path: str) -> int:
    """The sandbox's log file, appended to (an item that runs again, such as a deferred
    task resumed, keeps one log with each execution's output in order, and what was already
    shipped from it stays where it was), readable by the supervisor only; never a symlink."""
    return os.open(
        path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
    )


def write_all(fd: int, data: bytes) -> None:
    """Write all of ``data`` to ``fd``, however many writes a pipe or file takes."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
