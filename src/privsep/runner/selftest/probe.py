"""The attacker of ``runner selftest``: runs inside a real sandbox and tries one attack.

``probe.py ATTACK [ARGS...]`` prints one line ``SELFTEST <json>`` with what the attack reached,
and exits 0. It decides nothing: the verdict is the supervisor side's (:mod:`.battery`), so an
attack that works is reported, not hidden. It never prints what it read, only whether it could:
a selftest that leaked a key into its own scorecard would be the leak it is meant to find.

Standard library and ctypes only, and no syscall numbers: this file runs in whatever sandbox
the backend builds (the process backend's interpreter, or the container image's ``python3``),
so it calls glibc's wrappers by name.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import re
import socket
import sys
from collections.abc import Callable

libc = ctypes.CDLL(None, use_errno=True)

CLONE_NEWUSER = 0x10000000
CLONE_NEWNS = 0x00020000
PTRACE_ATTACH = 16
TIOCSTI = 0x5412
MARKER_RE = re.compile(rb"PRIVSEP-SELFTEST-[0-9a-f]{32}")


def _errname(code: int) -> str:
    return errno.errorcode.get(code, str(code))


def _call(fn: Callable[..., int], *args: object) -> str:
    """``ok`` or the errno's name: how a libc call ended."""
    ctypes.set_errno(0)
    if fn(*args) == -1:
        return _errname(ctypes.get_errno())
    return "ok"


def _os(fn: Callable[[], object]) -> str:
    try:
        fn()
    except OSError as exc:
        return _errname(exc.errno or 0)
    return "ok"


def _open_result(path: str) -> str:
    """``READ`` when the file opened for reading (nothing of it is kept), else the errno."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        return _errname(exc.errno or 0)
    os.close(fd)
    return "READ"


def _holds_marker(data: bytes, digest: str) -> bool:
    return any(hashlib.sha256(m.group()).hexdigest() == digest for m in MARKER_RE.finditer(data))


def _slurp(path: str) -> bytes:
    with open(path, "rb") as fh:
        return fh.read()


# -- the attacks -----------------------------------------------------------------------------


def read_secrets(*paths: str) -> dict[str, object]:
    """Open every secret the configuration names, and the planted one."""
    return {"opened": {path: _open_result(path) for path in paths}}


def environment(digest: str) -> dict[str, object]:
    """What the environment holds: its names, and whether the planted marker is in it."""
    blob = "\0".join(f"{k}={v}" for k, v in os.environ.items()).encode()
    return {
        "names": sorted(os.environ),
        "marker": _holds_marker(blob, digest)
        or _holds_marker(_slurp("/proc/self/cmdline"), digest),
    }


def supervisor_memory(pid: str, digest: str) -> dict[str, object]:
    """Read the selftest's /proc entries, then scan all of our own memory for its marker."""
    opened = {name: _open_result(f"/proc/{pid}/{name}") for name in ("environ", "mem", "maps")}
    found = False
    with open("/proc/self/maps") as maps, open("/proc/self/mem", "rb", 0) as mem:
        for line in maps:
            fields = line.split()
            if "r" not in fields[1] or (len(fields) > 5 and fields[5] in ("[vvar]", "[vsyscall]")):
                continue
            start, end = (int(x, 16) for x in fields[0].split("-"))
            try:
                mem.seek(start)
                found = found or _holds_marker(mem.read(end - start), digest)
            except (OSError, OverflowError, ValueError):
                continue
    return {"opened": opened, "marker": found}


def descriptors(digest: str) -> dict[str, object]:
    """Every open descriptor beyond stdio, and whether one of them reads the marker."""
    stray: dict[str, str] = {}
    marker = False
    for fd in range(3, 1025):
        try:
            os.fstat(fd)
        except OSError:
            continue
        try:
            stray[str(fd)] = os.readlink(f"/proc/self/fd/{fd}")
        except OSError as exc:
            stray[str(fd)] = _errname(exc.errno or 0)
        with contextlib.suppress(OSError):
            marker = marker or _holds_marker(os.pread(fd, 1 << 16, 0), digest)
    return {"stray": stray, "marker": marker}


def identity() -> dict[str, object]:
    """Our ids and what /proc/self/status says of capabilities, NoNewPrivs and seccomp."""
    status = dict(
        line.split(":\t", 1) for line in _slurp("/proc/self/status").decode().splitlines()
    )
    keys = ("CapPrm", "CapEff", "CapBnd", "CapAmb", "NoNewPrivs", "Seccomp")
    return {
        "uid": list(os.getresuid()),
        "gid": list(os.getresgid()),
        "groups": os.getgroups(),
        **{k: status.get(k, "").strip() for k in keys},
    }


def regain_root() -> dict[str, object]:
    """Every way back to root or to a fresh set of privileges that a process can ask for."""
    return {
        "setresuid": _os(lambda: os.setresuid(0, 0, 0)),
        "setgid": _os(lambda: os.setgid(0)),
        "setgroups": _os(lambda: os.setgroups([0])),
        "unshare_user": _call(libc.unshare, CLONE_NEWUSER),
        "unshare_mount": _call(libc.unshare, CLONE_NEWNS),
    }


def ptrace(pid: str) -> dict[str, object]:
    """Attach to the selftest itself and to our own PID 1."""
    return {
        f"attach:{target}": _call(libc.ptrace, PTRACE_ATTACH, int(target), None, None)
        for target in (pid, "1")
    }


def mount() -> dict[str, object]:
    """Mount a tmpfs over /tmp, and remount / read-write."""
    return {
        "tmpfs": _call(libc.mount, b"none", b"/tmp", b"tmpfs", 0, None),
        "remount_root": _call(libc.mount, b"none", b"/", None, 32, None),  # MS_REMOUNT
    }


def tiocsti() -> dict[str, object]:
    """Push a keystroke into a terminal's input queue, on stdio and on /dev/tty."""
    char = ctypes.c_char(b"x")
    out: dict[str, object] = {
        f"fd{fd}": _call(libc.ioctl, fd, TIOCSTI, ctypes.byref(char)) for fd in (0, 1, 2)
    }
    try:
        fd = os.open("/dev/tty", os.O_RDWR)
    except OSError as exc:
        out["dev_tty"] = _errname(exc.errno or 0)
    else:
        out["dev_tty"] = _call(libc.ioctl, fd, TIOCSTI, ctypes.byref(char))
    return out


def processes(pid: str) -> dict[str, object]:
    """Which processes we can see, and whether we can signal the selftest."""
    visible = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
    return {"visible": len(visible), "signal": _os(lambda: os.kill(int(pid), 0))}


def network(port: str, abstract: str, server_socket: str, server_host: str, server_port: str):  # type: ignore[no-untyped-def]
    """Reach a TCP listener and an abstract socket on the host, and the API server itself."""

    def tcp(host: str, port_text: str) -> str:
        if not host or not port_text.isdigit():
            return "none-configured"
        try:
            with socket.create_connection((host, int(port_text)), timeout=2):
                return "connected"
        except OSError as exc:
            return _errname(exc.errno or 0) if exc.errno else type(exc).__name__

    def unix(address: str) -> str:
        if not address or address == "\0":
            return "none-configured"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(2)
            try:
                sock.connect(address)
            except OSError as exc:
                return _errname(exc.errno or 0) if exc.errno else type(exc).__name__
            return "connected"

    return {
        "host_tcp": tcp("127.0.0.1", port),
        "host_abstract": unix("\0" + abstract),
        "server_socket": unix(server_socket),
        "server_tcp": tcp(server_host, server_port),
    }


ATTACKS: dict[str, Callable[..., dict[str, object]]] = {
    fn.__name__: fn
    for fn in (
        read_secrets,
        environment,
        supervisor_memory,
        descriptors,
        identity,
        regain_root,
        ptrace,
        mount,
        tiocsti,
        processes,
        network,
    )
}


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ATTACKS:
        print(f"probe: unknown attack {argv[:1]}", file=sys.stderr)
        return 2
    try:
        report = ATTACKS[argv[0]](*argv[1:])
    except Exception as exc:
        report = {"error": f"{type(exc).__name__}: {exc}"}
    print("SELFTEST " + json.dumps(report, sort_keys=True), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
