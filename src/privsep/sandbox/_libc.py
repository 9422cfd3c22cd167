"""The few Linux system calls Python 3.11 does not expose, through ctypes on libc.

Python 3.11 has no ``os.unshare``/``os.setns``/``mount``, so the sandbox calls libc directly.
Every wrapper raises :class:`OSError` with the errno and a description of what was attempted
(bubblewrap style: "what, on which object, then the OS reason"), so a failed setup step can be
reported to the supervisor word for word.

This module is imported inside sandboxed children before user code runs: it imports only
``ctypes``, ``os`` and ``struct`` so that a fresh interpreter starts quickly.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct

_libc = ctypes.CDLL(None, use_errno=True)

# <sched.h>
CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
CLONE_NEWTIME = 0x00000080

# <sys/mount.h>
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_NOATIME = 1024
MS_NODIRATIME = 2048
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MS_RELATIME = 1 << 21
MS_STRICTATIME = 1 << 24
MNT_DETACH = 2

# <linux/prctl.h>
PR_SET_PDEATHSIG = 1
PR_GET_DUMPABLE = 3
PR_SET_DUMPABLE = 4
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_GET_NO_NEW_PRIVS = 39
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2

# x86_64 / aarch64 syscall numbers for the calls without a libc wrapper we rely on.
_MACHINE = os.uname().machine
if _MACHINE == "x86_64":
    SYS_PIVOT_ROOT = 155
    SYS_CAPSET = 126
    SYS_UNSHARE = 272
elif _MACHINE == "aarch64":
    SYS_PIVOT_ROOT = 41
    SYS_CAPSET = 91
    SYS_UNSHARE = 97
else:  # pragma: no cover - other architectures are not supported yet
    raise ImportError(f"privsep.sandbox: unsupported machine {_MACHINE!r}")

# The same on every architecture (syscalls added after the tables were unified).
AT_FDCWD = -100
SYS_MOUNT_SETATTR = 442
AT_RECURSIVE = 0x8000
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
MOUNT_ATTR_NOEXEC = 0x8


class _MountAttr(ctypes.Structure):
    _fields_ = (
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    )


def _declare(name: str, restype: type, *argtypes: type) -> None:
    """Give libc's ``name`` its C signature, so ctypes converts (and checks) the arguments
    instead of passing every Python int as a C int."""
    func = getattr(_libc, name)
    func.restype = restype
    if argtypes:
        func.argtypes = argtypes


_declare("unshare", ctypes.c_int, ctypes.c_int)
_declare("mount", ctypes.c_int, *(ctypes.c_char_p,) * 3, ctypes.c_ulong, ctypes.c_char_p)
_declare("umount2", ctypes.c_int, ctypes.c_char_p, ctypes.c_int)
_declare("prctl", ctypes.c_int, ctypes.c_int, *(ctypes.c_ulong,) * 4)
_declare("syscall", ctypes.c_long)  # variadic: only the result type can be declared


def _check(result: int, what: str) -> int:
    if result == -1:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def _b(path: str | None) -> bytes | None:
    return None if path is None else os.fsencode(path)


def unshare(flags: int) -> None:
    """Move the caller into new namespaces (``unshare(2)``)."""
    _check(_libc.unshare(flags), f"unshare({describe_clone_flags(flags)})")


def setns(fd: int, nstype: int) -> None:
    """``setns(2)``: join the namespace ``fd`` refers to."""
    _check(_libc.setns(fd, nstype), f"setns({describe_clone_flags(nstype)})")


def mount(
    source: str | None,
    target: str,
    fstype: str | None,
    flags: int,
    data: str | None = None,
) -> None:
    """``mount(2)``; the error names the target and the filesystem type."""
    kind = "remount" if flags & MS_REMOUNT else "bind" if flags & MS_BIND else fstype
    what = f"mount ({kind}) {source or ''} on {target}".replace("  ", " ")
    _check(_libc.mount(_b(source), _b(target), _b(fstype), flags, _b(data)), what)


def mount_setattr(target: str, attr_set: int, *, recursive: bool) -> None:
    """``mount_setattr(2)`` (Linux 5.12): add ``MOUNT_ATTR_*`` flags to the mount at
    ``target`` and, with ``recursive``, to every mount below it, in one call.

    Only sets flags, never clears one, so flags locked by a user namespace and the atime
    mode stay as they are.
    """
    attr = _MountAttr(attr_set, 0, 0, 0)
    flags = AT_RECURSIVE if recursive else 0
    result = _libc.syscall(
        ctypes.c_long(SYS_MOUNT_SETATTR),
        ctypes.c_int(AT_FDCWD),
        _b(target),
        ctypes.c_uint(flags),
        ctypes.byref(attr),
        ctypes.c_size_t(ctypes.sizeof(attr)),
    )
    _check(result, f"mount_setattr {target}")


def has_mount_setattr() -> bool:
    """Whether the kernel has ``mount_setattr(2)``: a call with a bad fd says EBADF if so."""
    attr = _MountAttr(0, 0, 0, 0)
    ctypes.set_errno(0)
    result = _libc.syscall(
        ctypes.c_long(SYS_MOUNT_SETATTR),
        ctypes.c_int(-1),
        b"",
        ctypes.c_uint(0),
        ctypes.byref(attr),
        ctypes.c_size_t(ctypes.sizeof(attr)),
    )
    return not (result == -1 and ctypes.get_errno() == errno.ENOSYS)


def umount2(target: str, flags: int) -> None:
    """``umount2(2)``."""
    _check(_libc.umount2(_b(target), flags), f"umount {target}")


def pivot_root(new_root: str, put_old: str) -> None:
    """``pivot_root(2)`` (glibc has no wrapper)."""
    result = _libc.syscall(SYS_PIVOT_ROOT, _b(new_root), _b(put_old))
    _check(result, f"pivot_root {new_root}")


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    """``prctl(2)`` with integer arguments."""
    return _check(_libc.prctl(option, arg2, arg3, arg4, arg5), f"prctl({option})")


def set_pdeathsig(signum: int) -> None:
    """Ask the kernel to send ``signum`` when the parent thread exits."""
    prctl(PR_SET_PDEATHSIG, signum)


def set_no_new_privs() -> None:
    """``PR_SET_NO_NEW_PRIVS``: execve can never grant privileges again (setuid bits, caps)."""
    prctl(PR_SET_NO_NEW_PRIVS, 1)
    if prctl(PR_GET_NO_NEW_PRIVS) != 1:
        raise OSError(0, "PR_SET_NO_NEW_PRIVS did not stick")


def set_dumpable(flag: bool) -> None:
    """``PR_SET_DUMPABLE``: 0 makes /proc/<pid>/mem, environ and ptrace root-only."""
    prctl(PR_SET_DUMPABLE, 1 if flag else 0)


def is_dumpable() -> bool:
    """Whether ``PR_GET_DUMPABLE`` is set."""
    return prctl(PR_GET_DUMPABLE) == 1


def drop_bounding_set() -> None:
    """Empty the capability bounding set and the ambient set (needs CAP_SETPCAP).

    Nothing this process or its descendants execute can then gain a capability, whatever
    file capabilities or setuid bits it meets.
    """
    cap = 0
    while True:
        try:
            prctl(PR_CAPBSET_DROP, cap)
        except OSError as exc:
            if exc.errno == 22:  # EINVAL: past the last capability the kernel knows
                break
            raise
        cap += 1
    prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)


def drop_all_capabilities() -> None:
    """Clear the bounding, ambient, effective, permitted and inheritable capability sets.

    Needed in the user-namespace mode, where the process keeps full capabilities inside its
    namespace after ``unshare(CLONE_NEWUSER)`` even though its uid is not 0.
    """
    drop_bounding_set()
    # struct __user_cap_header_struct {u32 version; int pid;} with _LINUX_CAPABILITY_VERSION_3,
    # followed by two zeroed struct __user_cap_data_struct {u32 effective, permitted, inh;}.
    header = ctypes.create_string_buffer(struct.pack("=Ii", 0x20080522, 0))
    data = ctypes.create_string_buffer(bytes(24))
    _check(_libc.syscall(SYS_CAPSET, header, data), "capset(all empty)")


def load_seccomp_bpf(program: bytes) -> None:
    """Install a classic-BPF seccomp program (``struct sock_filter[]``, 8 bytes each).

    The program is compiled with pyseccomp in the trusted parent; loading raw BPF here keeps
    libseccomp (and its 20 ms import) out of every child.
    """
    if not program or len(program) % 8:
        raise OSError(0, f"seccomp program has a bad length {len(program)}")
    buf = ctypes.create_string_buffer(program, len(program))

    class SockFprog(ctypes.Structure):
        _fields_ = (("len", ctypes.c_ushort), ("filter", ctypes.c_void_p))

    prog = SockFprog(len(program) // 8, ctypes.cast(buf, ctypes.c_void_p))
    result = _libc.prctl(
        PR_SET_SECCOMP,
        SECCOMP_MODE_FILTER,
        ctypes.addressof(prog),
        0,
        0,
    )
    _check(result, "prctl(PR_SET_SECCOMP)")


def raw_syscall(number: int, *args: int) -> int:
    """Call syscall ``number`` with integer arguments; returns the result or ``-errno``.

    Used by the post-seccomp self-check and by the tests' probes, which need the errno of a
    call that has no Python wrapper.
    """
    ctypes.set_errno(0)
    result = int(_libc.syscall(ctypes.c_long(number), *(ctypes.c_long(a) for a in args)))
    if result == -1:
        return -ctypes.get_errno()
    return result


_FLAG_NAMES = (
    (CLONE_NEWUSER, "CLONE_NEWUSER"),
    (CLONE_NEWNS, "CLONE_NEWNS"),
    (CLONE_NEWPID, "CLONE_NEWPID"),
    (CLONE_NEWIPC, "CLONE_NEWIPC"),
    (CLONE_NEWUTS, "CLONE_NEWUTS"),
    (CLONE_NEWNET, "CLONE_NEWNET"),
    (CLONE_NEWCGROUP, "CLONE_NEWCGROUP"),
)


def sethostname(name: str) -> None:
    """``sethostname(2)`` in the caller's UTS namespace."""
    raw = name.encode()
    _check(_libc.sethostname(raw, ctypes.c_size_t(len(raw))), f"sethostname {name}")


def bring_up_loopback() -> None:
    """Set ``lo`` up in a fresh network namespace, so ``localhost`` works inside it."""
    fd = _check(_libc.socket(2, 2 | 0o2000000, 0), "socket(AF_INET) for lo")  # SOCK_CLOEXEC
    try:
        iff_up_loopback_running = 0x1 | 0x8 | 0x40
        ifreq = ctypes.create_string_buffer(struct.pack("16sH22x", b"lo", iff_up_loopback_running))
        _check(_libc.ioctl(fd, ctypes.c_ulong(0x8914), ifreq), "ioctl(SIOCSIFFLAGS, lo up)")
    finally:
        os.close(fd)


def describe_clone_flags(flags: int) -> str:
    """``CLONE_NEWNS|CLONE_NEWPID``-style text for error messages."""
    names = [name for bit, name in _FLAG_NAMES if flags & bit]
    rest = flags & ~sum(bit for bit, _ in _FLAG_NAMES)
    if rest:
        names.append(hex(rest))
    return "|".join(names) or "0"
