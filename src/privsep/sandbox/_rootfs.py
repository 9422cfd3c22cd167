"""Build the sandbox's filesystem view: an allow-list root, then ``pivot_root`` into it.

Rather than hiding what must not be seen (a deny-list that misses whatever nobody thought of),
the child starts from an empty tmpfs and bind-mounts in only what it needs, each at its own path:

* system directories (``/usr``, ``/etc`` and the ``/bin``-style symlinks), read-only;
* the interpreter, its site-packages and the privsep source (the child's own ``sys.path``),
  and the spec's code and bundle paths, read-only, even when they live under a 0700 directory
  such as ``/root``: the intermediate directories are created in the tmpfs with mode 0755;
* the working directory, read-write; the credential socket, as a single file;
* a minimal ``/dev``, a fresh ``/proc`` for the new PID namespace, a size-capped ``/tmp``.

Paths the spec hides (state, config, credentials) that still fall inside a bound tree get an
empty read-only tmpfs (directories) or ``/dev/null`` on a ``nodev`` mount (files) on top.
Every bind ends ``nosuid,nodev`` (the device binds ``nosuid,noexec``) and, except the work dir
and the scratch filesystems, read-only; ``/dev`` and the root tmpfs itself end read-only.

Where the kernel has ``mount_setattr(2)`` (Linux 5.12) each bind gets its final flags right
after it is made, with one call for the whole bound tree (``AT_RECURSIVE``); older kernels
remount every mount once the view is complete, reading ``/proc/self/mountinfo`` for the
flags each already has. Either way flags are only added, never cleared: in a user namespace
the source's ``ro``/``noexec``/atime flags are locked.

Sources are opened with ``O_PATH`` before the staging tmpfs goes up and bound through
``/proc/self/fd``, so a source under ``/tmp`` (where the staging root is mounted) still works and
nothing is resolved twice.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterator
from typing import NamedTuple

from privsep.sandbox import _libc as libc
from privsep.sandbox._libc import (
    MNT_DETACH,
    MS_BIND,
    MS_NODEV,
    MS_NOEXEC,
    MS_NOSUID,
    MS_PRIVATE,
    MS_RDONLY,
    MS_REC,
    MS_REMOUNT,
)

# The staging mount point: any existing directory works, since the mount namespace is private.
STAGING = "/tmp"  # noqa: S108
TMP = STAGING + "/tmp"  # noqa: S108 - the sandbox's own private /tmp
SHM = "/dev/shm"  # noqa: S108 - likewise private
DEVICES = ("null", "zero", "full", "random", "urandom")
_ATIME_FLAGS = {
    "noatime": libc.MS_NOATIME,
    "nodiratime": libc.MS_NODIRATIME,
    "relatime": libc.MS_RELATIME,
}
_LOCKABLE = {"ro": MS_RDONLY, "nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC}

RO, RW, SOCKET, DEVICE, LINK = "ro", "rw", "socket", "device", "link"
_ATTRS = {  # the flags each kind of bind ends with (mount_setattr kernels)
    RO: libc.MOUNT_ATTR_RDONLY | libc.MOUNT_ATTR_NOSUID | libc.MOUNT_ATTR_NODEV,
    RW: libc.MOUNT_ATTR_NOSUID | libc.MOUNT_ATTR_NODEV,
    SOCKET: libc.MOUNT_ATTR_RDONLY | libc.MOUNT_ATTR_NOSUID | libc.MOUNT_ATTR_NODEV,
    DEVICE: libc.MOUNT_ATTR_RDONLY | libc.MOUNT_ATTR_NOSUID | libc.MOUNT_ATTR_NOEXEC,
}
# Probed once at import (in the zygote, before it forks): about 25 remounts and a mountinfo
# parse per sandbox become one call per bind.
SET_ATTRS_ON_BIND = libc.has_mount_setattr()


def minimal_paths(paths: list[str]) -> list[str]:
    """Drop every path that lies inside another one in the list (it is visible already)."""
    out: list[str] = []
    for path in sorted(set(paths), key=lambda p: p.split("/")):
        if not any(path == kept or path.startswith(kept.rstrip("/") + "/") for kept in out):
            out.append(path)
    return out


def _inside(path: str, parents: list[str]) -> bool:
    return any(path == p or path.startswith(p.rstrip("/") + "/") for p in parents)


class HostLayout(NamedTuple):
    """What of the host the spec-independent view shows, resolved once (see :func:`host_layout`)."""

    links: tuple[tuple[str, str], ...]  # (path, symlink target) recreated in the view
    ro_dirs: tuple[str, ...]  # host trees bound read-only, each at its own path


_layouts: dict[tuple[tuple[str, ...], tuple[str, ...]], HostLayout] = {}


def host_layout(system_paths: list[str], runtime_paths: list[str]) -> HostLayout:
    """Which system paths are symlinks or directories, and which runtime paths still need a
    bind of their own; cached per argument list.

    The answer is the same for every sandbox, so the zygote computes it before it forks and
    each child inherits the cache instead of repeating the ``lstat``/``readlink`` walk (about
    half a millisecond of CPU per sandbox). A host path that changes kind afterwards fails
    the sandbox's bind, with the path named, rather than being silently skipped.
    """
    key = (tuple(system_paths), tuple(runtime_paths))
    cached = _layouts.get(key)
    if cached is not None:
        return cached
    links: list[tuple[str, str]] = []
    system_dirs: list[str] = []
    for path in system_paths:
        if os.path.islink(path):
            links.append((path, os.readlink(path)))
        elif os.path.isdir(path):
            system_dirs.append(path)
    runtime = [
        path
        for path in minimal_paths(runtime_paths)
        if not _inside(path, system_dirs) and os.path.exists(path)
    ]
    layout = _layouts[key] = HostLayout(tuple(links), (*system_dirs, *runtime))
    return layout


def prepare_root(layout: HostLayout) -> list[str]:
    """Build the spec-independent part of the view in a staging tmpfs.

    System directories, the interpreter's own paths (both as :func:`host_layout` resolved
    them), a minimal ``/dev``, a ``/proc`` for the new PID namespace and the private ``/tmp``.
    A pre-warmed sandbox stops here until its launch request says what else to bind
    (:func:`finish_root`). Must run as root (real or user-namespace root) in a new mount
    namespace, inside the new PID namespace. Returns the host trees now bound (for
    :func:`finish_root`).
    """
    with _sandbox_paths_in_errors():
        libc.mount(None, "/", None, MS_REC | MS_PRIVATE)
        plan: list[tuple[str, str, int]] = []  # (path inside, kind, O_PATH fd)
        try:
            # Open every source while the host view is still there.
            for path in layout.ro_dirs:
                plan.append((path, RO, _open_path(path)))
            for name in DEVICES:
                plan.append((f"/dev/{name}", DEVICE, _open_path(f"/dev/{name}")))

            # The host's STAGING directory, kept before the staging root hides it: spec paths
            # under it are opened through this fd once the request arrives (finish_root).
            global _host_staging_fd
            _host_staging_fd = os.open(STAGING, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            libc.mount("privsep-root", STAGING, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=1m")
            # The private /tmp goes first, so a bound path under the host's /tmp stays visible.
            os.mkdir(TMP, 0o755)
            libc.mount("tmpfs", TMP, "tmpfs", MS_NOSUID | MS_NODEV, _tmpfs_options(1777, 64 << 20))
            _build_dev()
            for path, target in layout.links:
                os.symlink(target, STAGING + path)
            for path, kind, fd in sorted(plan, key=lambda item: item[0].split("/")):
                _bind_fd(fd, STAGING + path, kind)
        finally:
            for _, _, fd in plan:
                os.close(fd)
        os.mkdir(STAGING + "/proc", 0o755)
        _mount_proc(STAGING + "/proc")
    return list(layout.ro_dirs)


def finish_root(
    *,
    bound: list[str],
    ro_paths: list[str],
    workdir: str,
    socket: str | None,
    hidden_paths: list[str],
    tmp_bytes: int,
) -> None:
    """Add the spec's paths to the prepared view, lock it down and ``pivot_root`` into it.

    Raises ``OSError`` naming the path that failed, as the sandbox would see it.
    """
    with _sandbox_paths_in_errors():
        plan: list[tuple[str, str, int]] = []
        try:
            for path in minimal_paths(ro_paths):
                if not _inside(path, bound):
                    fd = _open_host_path(path, missing_ok=True)
                    if fd >= 0:
                        plan.append((path, RO, fd))
            plan.append((workdir, RW, _open_host_path(workdir)))
            if socket is not None:
                plan.append((socket, SOCKET, _open_host_path(socket)))
            for path, kind, fd in sorted(plan, key=lambda item: item[0].split("/")):
                _bind_fd(fd, STAGING + path, kind)
        finally:
            for _, _, fd in plan:
                os.close(fd)
        for target in (TMP, STAGING + SHM):
            flags = MS_REMOUNT | MS_NOSUID | MS_NODEV | (MS_NOEXEC if target != TMP else 0)
            libc.mount(None, target, None, flags, _tmpfs_size(tmp_bytes))

        # Hide what leaked in through a bound tree.
        for path in hidden_paths:
            _hide(STAGING + path)

        # Everything read-only, nosuid, nodev, except the writable places.
        if SET_ATTRS_ON_BIND:  # the binds have theirs already; /dev and the root last
            libc.mount_setattr(STAGING + "/dev", libc.MOUNT_ATTR_RDONLY, recursive=False)
            libc.mount_setattr(STAGING, libc.MOUNT_ATTR_RDONLY, recursive=False)
        else:
            devices = {STAGING + f"/dev/{name}" for name in DEVICES}
            _lock_down({STAGING + workdir}, {TMP, STAGING + SHM, STAGING + "/proc"}, devices)

        # Swap roots and drop the host's tree.
        global _host_staging_fd
        if _host_staging_fd >= 0:
            os.close(_host_staging_fd)
            _host_staging_fd = -1
        os.chdir(STAGING)
        libc.pivot_root(".", ".")
        libc.umount2(".", MNT_DETACH)
        os.chdir("/")


@contextlib.contextmanager
def _sandbox_paths_in_errors() -> Iterator[None]:
    """Report staging paths (``/tmp/usr``) as the sandbox sees them (``/usr``)."""
    try:
        yield
    except OSError as exc:
        text = exc.strerror or str(exc)
        raise OSError(exc.errno, text.replace(f" {STAGING}/", " /")) from None


def _tmpfs_size(size: int) -> str:
    return f"size={size},nr_inodes={max(1024, min(size // 4096, 1 << 20))}"


def _tmpfs_options(mode: int, size: int) -> str:
    return f"mode={mode},{_tmpfs_size(size)}"


_host_staging_fd = -1


def _open_host_path(path: str, *, missing_ok: bool = False) -> int:
    """O_PATH fd on a host path, also under STAGING (hidden by the staging root by now)."""
    try:
        if _host_staging_fd >= 0 and path.startswith(STAGING + "/"):
            rel = path[len(STAGING) + 1 :]
            return os.open(rel, os.O_PATH | os.O_CLOEXEC, dir_fd=_host_staging_fd)
        return os.open(path, os.O_PATH | os.O_CLOEXEC)
    except FileNotFoundError:
        if missing_ok:
            return -1
        raise OSError(errno.ENOENT, f"cannot open {path} to bind it: not found") from None
    except OSError as exc:
        raise OSError(exc.errno, f"cannot open {path} to bind it: {exc.strerror}") from None


def _open_path(path: str) -> int:
    try:
        return os.open(path, os.O_PATH | os.O_CLOEXEC)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot open {path} to bind it: {exc.strerror}") from None


def _bind_fd(fd: int, target: str, kind: str) -> None:
    mode = os.fstat(fd).st_mode
    if not os.path.lexists(target):  # else: visible through a bound tree, mount on top
        os.makedirs(os.path.dirname(target), 0o755, exist_ok=True)
        if stat.S_ISDIR(mode):
            os.mkdir(target, 0o755)
        else:
            os.close(os.open(target, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o644))
    recursive = kind in (RO, RW)
    libc.mount(f"/proc/self/fd/{fd}", target, None, MS_BIND | (MS_REC if recursive else 0))
    if SET_ATTRS_ON_BIND:
        libc.mount_setattr(target, _ATTRS[kind], recursive=recursive)


def _build_dev() -> None:
    dev = STAGING + "/dev"
    os.mkdir(dev, 0o755)
    libc.mount("tmpfs", dev, "tmpfs", MS_NOSUID | MS_NOEXEC, "mode=0755,size=64k,nr_inodes=64")
    for name, target in (
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ):
        os.symlink(target, f"{dev}/{name}")
    os.mkdir(STAGING + SHM, 0o755)
    flags = MS_NOSUID | MS_NODEV | MS_NOEXEC
    libc.mount("tmpfs", STAGING + SHM, "tmpfs", flags, _tmpfs_options(1777, 64 << 20))


def _mount_proc(target: str) -> None:
    flags = MS_NOSUID | MS_NODEV | MS_NOEXEC
    for options in ("hidepid=invisible", "hidepid=2", None):
        try:
            libc.mount("proc", target, "proc", flags, options)
            return
        except OSError as exc:
            if options is None or "Invalid argument" not in str(exc):
                raise


def _hide(target: str) -> None:
    if not os.path.lexists(target):
        return
    if os.path.isdir(target) and not os.path.islink(target):
        libc.mount(
            "hidden",
            target,
            "tmpfs",
            MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC,
            "mode=000,size=4k,nr_inodes=1",
        )
    elif os.path.isfile(target) and not os.path.islink(target):
        libc.mount("/dev/null", target, None, MS_BIND)
        if SET_ATTRS_ON_BIND:
            libc.mount_setattr(target, _ATTRS[RO], recursive=False)
    else:
        raise OSError(0, f"cannot hide {target}: neither a plain file nor a directory")


def _mountinfo() -> list[tuple[str, int]]:
    """(mount point, per-mount flags) for each line of /proc/self/mountinfo."""
    out: list[tuple[str, int]] = []
    with open("/proc/self/mountinfo", "rb") as fh:
        for line in fh:
            fields = line.split(b" ")
            point = _unescape(fields[4])
            flags = 0
            for option in fields[5].decode().split(","):
                flags |= _LOCKABLE.get(option, 0) | _ATIME_FLAGS.get(option, 0)
            out.append((point, flags))
    return out


def _unescape(raw: bytes) -> str:
    text = raw.decode("utf-8", "surrogateescape")
    if "\\" not in text:
        return text
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and text[i + 1 : i + 4].isdigit() and i + 4 <= len(text):
            out.append(chr(int(text[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def _lock_down(writable: set[str], scratch: set[str], devices: set[str]) -> None:
    """Remount every mount under the staging root with the flags it should end with (kernels
    without ``mount_setattr``).

    Flags already set on the source mount (``ro``, ``noexec``, atime) are kept: in a user
    namespace they are locked, and dropping one would fail with EPERM.
    """
    for point, current in _mountinfo():
        if point != STAGING and not point.startswith(STAGING + "/"):
            continue
        if point in scratch:
            continue  # mounted above with exactly the flags they need
        if point in writable:
            wanted = current | MS_NOSUID | MS_NODEV
        elif point in devices:
            wanted = current | MS_RDONLY | MS_NOSUID | MS_NOEXEC
        elif point == STAGING + "/dev":
            wanted = current | MS_RDONLY | MS_NOSUID | MS_NOEXEC
        else:
            wanted = current | MS_RDONLY | MS_NOSUID | MS_NODEV
        libc.mount(None, point, None, MS_BIND | MS_REMOUNT | wanted)
    # The root tmpfs last: nothing below needs creating any more.
    root_flags = MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV
    libc.mount(None, STAGING, None, root_flags)
