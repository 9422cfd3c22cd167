"""The seccomp deny-list every sandbox runs under, compiled once with pyseccomp.

The filter allows by default and answers ``EPERM`` for calls that only serve to escape or to
attack the kernel or other processes. It is compiled here, in the trusted parent, and exported as
classic BPF; children load the bytes with one ``prctl`` (see ``_libc.load_seccomp_bpf``), which
keeps libseccomp out of every child's startup.

Beyond the names in issue 4 the filter also denies what would undo it: ``clone`` with any
``CLONE_NEW*`` flag (a new user namespace would hand user code a full capability set), ``clone3``
(its flags sit behind a pointer the filter cannot read, so it answers ``ENOSYS`` and glibc falls
back to ``clone``), the new mount API and io_uring. A system call from a foreign ABI (i386 via
``int 0x80``, x32) kills the process: libseccomp's bad-architecture action.
"""

from __future__ import annotations

import errno
import tempfile
from functools import cache

# The calls issue 4 names; a libseccomp that cannot resolve one of these is an error.
REQUIRED_DENY: tuple[str, ...] = (
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "mount",
    "umount2",
    "pivot_root",
    "unshare",
    "setns",
    "keyctl",
    "add_key",
    "request_key",
    "bpf",
    "perf_event_open",
    "kexec_load",
    "kexec_file_load",
    "init_module",
    "finit_module",
    "delete_module",
    "reboot",
    "swapon",
    "swapoff",
    "userfaultfd",
)

# Further calls with no business in a sandbox (close to Docker's default profile). Names an old
# libseccomp does not know are skipped: they are for syscalls newer than the library.
EXTRA_DENY: tuple[str, ...] = (
    "acct",
    "chroot",
    "clock_adjtime",
    "clock_settime",
    "create_module",
    "fsconfig",
    "fsmount",
    "fsopen",
    "fspick",
    "get_kernel_syms",
    "io_uring_enter",
    "io_uring_register",
    "io_uring_setup",
    "iopl",
    "ioperm",
    "kcmp",
    "lookup_dcookie",
    "mount_setattr",
    "move_mount",
    "name_to_handle_at",
    "nfsservctl",
    "open_by_handle_at",
    "open_tree",
    "query_module",
    "quotactl",
    "settimeofday",
    "stime",
    "sysfs",
    "umount",
    "uselib",
    "ustat",
    "vm86",
    "vm86old",
    "_sysctl",
)

# ioctl requests that push bytes into a terminal's input queue (TIOCSTI) or a virtual console
# (TIOCLINUX). The request is an int, so only the low 32 bits are compared.
TIOCSTI = 0x5412
TIOCLINUX = 0x541C
DENIED_IOCTLS: tuple[int, ...] = (TIOCSTI, TIOCLINUX)

# clone flags that would create a namespace.
NAMESPACE_CLONE_FLAGS: tuple[int, ...] = (
    0x00020000,  # CLONE_NEWNS
    0x02000000,  # CLONE_NEWCGROUP
    0x04000000,  # CLONE_NEWUTS
    0x08000000,  # CLONE_NEWIPC
    0x10000000,  # CLONE_NEWUSER
    0x20000000,  # CLONE_NEWPID
    0x40000000,  # CLONE_NEWNET
    0x00000080,  # CLONE_NEWTIME
)


_CLONE3_NR = 435


class SeccompUnavailable(RuntimeError):
    """libseccomp is missing or cannot express the policy; sandboxes must not start."""


@cache
def compile_filter() -> bytes:
    """The policy as classic BPF bytes, ready for ``PR_SET_SECCOMP``. Cached per process."""
    try:
        import pyseccomp as sc
    except (ImportError, OSError) as exc:  # OSError: libseccomp.so missing
        raise SeccompUnavailable(f"cannot load pyseccomp/libseccomp: {exc}") from None

    deny = sc.ERRNO(errno.EPERM)
    filt = sc.SyscallFilter(sc.ALLOW)
    filt.set_attr(sc.Attr.ACT_BADARCH, sc.KILL_PROCESS)
    for name in REQUIRED_DENY:
        try:
            filt.add_rule(deny, name)
        except (OSError, ValueError, RuntimeError) as exc:
            raise SeccompUnavailable(f"libseccomp cannot deny {name}: {exc}") from None
    for name in EXTRA_DENY:
        try:
            filt.add_rule(deny, name)
        except (OSError, ValueError, RuntimeError):
            continue
    for request in DENIED_IOCTLS:
        filt.add_rule(deny, "ioctl", sc.Arg(1, sc.MASKED_EQ, 0xFFFFFFFF, request))
    for flag in NAMESPACE_CLONE_FLAGS:
        filt.add_rule(deny, "clone", sc.Arg(0, sc.MASKED_EQ, flag, flag))
    try:
        filt.add_rule(sc.ERRNO(errno.ENOSYS), "clone3")
    except (OSError, ValueError, RuntimeError):
        # An old libseccomp may not know the name; the number is the same on every arch.
        filt.add_rule(sc.ERRNO(errno.ENOSYS), _CLONE3_NR)
    with tempfile.TemporaryFile() as out:
        filt.export_bpf(out)
        out.seek(0)
        program = out.read()
    if not program or len(program) % 8:
        raise SeccompUnavailable(f"libseccomp exported a malformed program ({len(program)} B)")
    return program
