"""The hostile child: run inside a real sandbox, attempt one attack, report what happened.

``probe.py ATTACK [ARGS...]`` prints one line ``RESULT <json>`` (unless the attack is one whose
point is to die or to flood the output) and exits 0. The tests assert on the report and on the
sandbox's exit status; nothing here decides pass or fail, so a successful attack is reported,
not hidden.

Only stdlib and ctypes: this file must work in any sandbox the backend builds.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long

SECRET_PREFIX = b"PRIVSEP-PLANTED-SECRET-"
SECRET_RE = re.compile(re.escape(SECRET_PREFIX) + rb"[0-9a-f]{32}")
BAD_PTR = 8  # never mapped: "allowed" calls fail with EFAULT rather than EPERM


def err(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno is not None:
        return errno.errorcode.get(exc.errno, str(exc.errno))
    return type(exc).__name__


def syscall(number: int, *args: int) -> str:
    ctypes.set_errno(0)
    result = libc.syscall(ctypes.c_long(number), *(ctypes.c_long(a) for a in args))
    if result == -1:
        return errno.errorcode.get(ctypes.get_errno(), str(ctypes.get_errno()))
    return f"ok:{result}"


def nr(name: str) -> int:
    import pyseccomp

    return int(pyseccomp.resolve_syscall(pyseccomp.system_arch(), name))


def try_read(path: str, limit: int = 1 << 20) -> str:
    try:
        with open(path, "rb") as fh:
            data = fh.read(limit)
    except OSError as exc:
        return err(exc)
    return f"READ:{len(data)}:" + hashlib.sha256(data).hexdigest()[:12]


# -- attacks ------------------------------------------------------------------------------


def supervisor_proc(pid: str) -> dict[str, object]:
    """Read /proc/<supervisor>/{environ,mem,cmdline,...} and list what /proc shows."""
    files = ("environ", "mem", "cmdline", "status", "maps", "fd")
    out: dict[str, object] = {f: try_read(f"/proc/{pid}/{f}") for f in files if f != "fd"}
    try:
        out["fd"] = os.listdir(f"/proc/{pid}/fd")
    except OSError as exc:
        out["fd"] = err(exc)
    out["visible_pids"] = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
    return out


def read_files(*paths: str) -> dict[str, object]:
    """Try to read each path (or list it, for directories)."""
    out: dict[str, object] = {}
    for path in paths:
        if os.path.isdir(path):
            try:
                out[path] = "LIST:" + ",".join(sorted(os.listdir(path)))
            except OSError as exc:
                out[path] = err(exc)
        else:
            out[path] = try_read(path)
    return out


def _slurp(path: str) -> bytes:
    with open(path, "rb") as fh:
        return fh.read()


def _found(data: bytes, digest: str) -> bool:
    return any(hashlib.sha256(m.group()).hexdigest() == digest for m in SECRET_RE.finditer(data))


def find_secret(digest: str) -> dict[str, object]:
    """Look for the supervisor's planted secret in our env, memory and inherited fds."""
    out: dict[str, object] = {}
    env_blob = "\0".join(f"{k}={v}" for k, v in os.environ.items()).encode()
    out["env_names"] = sorted(os.environ)
    out["in_env"] = _found(env_blob, digest)
    out["in_proc_environ"] = _found(_slurp("/proc/self/environ"), digest)
    out["in_cmdline"] = _found(_slurp("/proc/self/cmdline"), digest)
    scanned = 0
    hit = False
    with open("/proc/self/maps") as maps, open("/proc/self/mem", "rb", 0) as mem:
        for line in maps:
            fields = line.split()
            if "r" not in fields[1] or (len(fields) > 5 and fields[5] == "[vvar]"):
                continue
            start, end = (int(x, 16) for x in fields[0].split("-"))
            try:
                mem.seek(start)
                chunk = mem.read(end - start)
            except (OSError, OverflowError, ValueError):
                continue
            scanned += len(chunk)
            if _found(chunk, digest):
                hit = True
    out["memory_scanned_mb"] = scanned >> 20
    out["in_memory"] = hit
    fd_hits = []
    for fd in range(0, 1025):
        try:
            os.fstat(fd)
        except OSError:
            continue
        try:
            os.set_blocking(fd, False)
            data = os.pread(fd, 1 << 20, 0)
        except OSError:
            continue
        if _found(data, digest):
            fd_hits.append(fd)
    out["in_fds"] = fd_hits
    return out


def open_fds() -> dict[str, object]:
    """Every fd from 0 to 1024 that is open, and what it points at."""
    found = {}
    for fd in range(0, 1025):
        try:
            os.fstat(fd)
        except OSError:
            continue
        try:
            found[fd] = os.readlink(f"/proc/self/fd/{fd}")
        except OSError as exc:
            found[fd] = err(exc)
    return {"fds": found}


def ids() -> dict[str, object]:
    status = dict(
        line.split(":\t", 1)
        for line in _slurp("/proc/self/status").decode().splitlines()
        if ":\t" in line
    )
    keys = ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb", "NoNewPrivs", "Seccomp")
    return {
        "uid": os.getresuid(),
        "gid": os.getresgid(),
        "groups": os.getgroups(),
        **{k: status.get(k, "").strip() for k in keys},
    }


def regain_root() -> dict[str, object]:
    out: dict[str, object] = {}
    for name, attempt in (
        ("setresuid", lambda: os.setresuid(0, 0, 0)),
        ("setuid", lambda: os.setuid(0)),
        ("seteuid", lambda: os.seteuid(0)),
        ("setgid", lambda: os.setgid(0)),
        ("setgroups", lambda: os.setgroups([0])),
    ):
        try:
            attempt()
            out[name] = "ok"
        except OSError as exc:
            out[name] = err(exc)
    out["unshare_user"] = syscall(nr("unshare"), 0x10000000)
    out["clone_newuser"] = syscall(nr("clone"), 0x10000000 | signal.SIGCHLD, 0, 0, 0, 0)
    if out["clone_newuser"] == "ok:0":  # we are the child of a successful clone
        os._exit(0)
    out["clone3"] = syscall(nr("clone3"), 0, 0)
    out["ids_after"] = [os.getresuid(), os.getresgid()]
    return out


def setuid_binary(path: str) -> dict[str, object]:
    proc = subprocess.run([path], capture_output=True, text=True, check=False)
    return {"rc": proc.returncode, "out": proc.stdout.strip(), "err": proc.stderr.strip()}


def ptrace(*pids: str) -> dict[str, object]:
    out: dict[str, object] = {}
    for pid in [*pids, "1"]:
        out[f"attach:{pid}"] = syscall(nr("ptrace"), 16, int(pid), 0, 0)  # PTRACE_ATTACH
        out[f"seize:{pid}"] = syscall(nr("ptrace"), 0x4206, int(pid), 0, 0)
        local = (ctypes.c_char * 8)()
        iov_local = (ctypes.c_void_p * 2)(ctypes.addressof(local), 8)
        iov_remote = (ctypes.c_void_p * 2)(0x400000, 8)
        out[f"vm_readv:{pid}"] = syscall(
            nr("process_vm_readv"),
            int(pid),
            ctypes.addressof(iov_local),
            1,
            ctypes.addressof(iov_remote),
            1,
            0,
        )
    out["traceme"] = syscall(nr("ptrace"), 0, 0, 0, 0)
    return out


def tiocsti() -> dict[str, object]:
    char = ctypes.c_char(b"x")
    out: dict[str, object] = {}
    for fd in (0, 1, 2):
        out[f"TIOCSTI:{fd}"] = syscall(nr("ioctl"), fd, 0x5412, ctypes.addressof(char))
        # The request is an int: high bits must not slip past the filter.
        out[f"TIOCSTI_hi:{fd}"] = syscall(nr("ioctl"), fd, 0x1_0000_5412, ctypes.addressof(char))
        out[f"TIOCLINUX:{fd}"] = syscall(nr("ioctl"), fd, 0x541C, ctypes.addressof(char))
    try:
        fd = os.open("/dev/tty", os.O_RDWR)
        out["dev_tty"] = syscall(nr("ioctl"), fd, 0x5412, ctypes.addressof(char))
    except OSError as exc:
        out["dev_tty"] = err(exc)
    return out


DENIED_PROBES: dict[str, tuple[int, ...]] = {
    # Arguments chosen so that, were the call allowed, it would fail differently (EFAULT,
    # EBADF, EINVAL, ESRCH) or succeed; EPERM therefore means the filter answered.
    "ptrace": (0x4206, 0, 0, 0),
    "process_vm_readv": (0, 0, 0, 0, 0, 0),
    "process_vm_writev": (0, 0, 0, 0, 0, 0),
    "mount": (BAD_PTR, BAD_PTR, BAD_PTR, 0, 0),
    "umount2": (BAD_PTR, 0),
    "pivot_root": (BAD_PTR, BAD_PTR),
    "unshare": (0,),
    "setns": (-1, 0),
    "keyctl": (0xFFFF, 0, 0, 0, 0),
    "add_key": (BAD_PTR, BAD_PTR, 0, 0, 0),
    "request_key": (BAD_PTR, BAD_PTR, 0, 0),
    "bpf": (0xFFFF, 0, 0),
    "perf_event_open": (BAD_PTR, 0, -1, -1, 0),
    "kexec_load": (0, 0, 0, 0xFFFFFFFF),
    "kexec_file_load": (-1, -1, 0, 0, 0xFFFFFFFF),
    "init_module": (BAD_PTR, 0, BAD_PTR),
    "finit_module": (-1, 0, 0xFFFF),
    "delete_module": (BAD_PTR, 0),
    "reboot": (0, 0, 0, 0),
    "swapon": (BAD_PTR, 0),
    "swapoff": (BAD_PTR,),
    "userfaultfd": (0xFFFFFFF,),
}


def denied_syscalls() -> dict[str, object]:
    out: dict[str, object] = {
        name: syscall(nr(name), *args) for name, args in DENIED_PROBES.items()
    }
    out["getpid"] = syscall(nr("getpid"))  # control: allowed calls still work
    return out


def x32_syscall() -> dict[str, object]:
    """A syscall through the x32 ABI: the filter must kill us rather than let it through."""
    print("RESULT " + json.dumps({"before": True}), flush=True)
    return {"after": syscall(0x40000000 | 39)}  # __X32_SYSCALL_BIT | getpid


def connect_abstract(name: str) -> dict[str, object]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect("\0" + name)
        return {"abstract": "connected"}
    except OSError as exc:
        return {"abstract": err(exc)}


def connect_tcp(port: str) -> dict[str, object]:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(3)
    try:
        s.connect(("127.0.0.1", int(port)))
        return {"tcp": "connected"}
    except OSError as exc:
        return {"tcp": err(exc)}


def signal_pids(*pids: str) -> dict[str, object]:
    out: dict[str, object] = {}
    for pid in pids:
        for sig in (0, signal.SIGKILL):
            try:
                os.kill(int(pid), sig)
                out[f"{pid}:{sig}"] = "ok"
            except OSError as exc:
                out[f"{pid}:{sig}"] = err(exc)
    return out


def double_fork() -> dict[str, object]:
    """Leave a daemon behind (setsid, second fork) and return at once."""
    pid = os.fork()
    if pid == 0:
        os.setsid()
        if os.fork() == 0:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            while True:
                time.sleep(0.05)
        os._exit(0)
    os.waitpid(pid, 0)
    return {"daemon_left": True}


def fork_bomb() -> dict[str, object]:
    children = 0
    error = "none"
    for _ in range(100_000):
        try:
            pid = os.fork()
        except OSError as exc:
            error = err(exc)
            break
        if pid == 0:
            time.sleep(30)
            os._exit(0)
        children += 1
    return {"children": children, "error": error}


def memory_bomb() -> dict[str, object]:
    hold = []
    error = "none"
    try:
        for _ in range(4096):
            hold.append(bytearray(16 << 20))  # touched: bytearray zero-fills
    except MemoryError:
        error = "MemoryError"
    return {"allocated_mb": 16 * len(hold), "error": error}


def memory_bomb_forked(children: str, mb: str) -> dict[str, object]:
    """Several processes, each under the per-process limit, together far over the sandbox's."""
    pids = []
    for _ in range(int(children)):
        pid = os.fork()
        if pid == 0:
            hold = []
            try:
                for _ in range(int(mb) // 16):
                    hold.append(bytearray(16 << 20))
            except MemoryError:
                os._exit(3)
            time.sleep(1)
            os._exit(0)
        pids.append(pid)
    statuses = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]
    return {"children": statuses}


def fd_exhaustion() -> dict[str, object]:
    opened = []
    error = "none"
    try:
        for _ in range(1_000_000):
            opened.append(os.open("/dev/null", os.O_RDONLY))
    except OSError as exc:
        error = err(exc)
    return {"opened": len(opened), "error": error}


def cpu_spin() -> dict[str, object]:
    while True:
        pass


def disk_fill(directory: str) -> dict[str, object]:
    out: dict[str, object] = {}
    for target in (os.path.join(directory, "fill"), "/tmp/fill"):
        written = 0
        error = "none"
        block = b"\0" * (1 << 20)
        try:
            with open(target, "wb", buffering=0) as fh:
                for _ in range(100_000):
                    written += fh.write(block)
        except OSError as exc:
            error = err(exc)
        out[target] = {"written": written, "error": error}
    files = 0
    try:
        for i in range(1_000_000):
            open(f"/tmp/f{i}", "wb").close()
            files += 1
    except OSError as exc:
        out["tmp_inodes"] = {"files": files, "error": err(exc)}
    return out


def log_flood(size: str) -> dict[str, object]:
    total = int(size)
    chunk = b"A" * 65536
    sent = 0
    while sent < total:
        sent += sys.stdout.buffer.write(chunk[: total - sent])
    sys.stdout.buffer.flush()
    sys.stderr.write("\nRESULT " + json.dumps({"sent": sent}) + "\n")
    sys.stderr.flush()
    return {}


def ansi() -> dict[str, object]:
    sys.stdout.write("\x1b[31mRED\x1b[0m \x1b]0;pwned-title\x07 \x1b[2J bell\x07 cr\roverwrite\n")
    sys.stdout.write("bidi \u202eevil\u202c zero\u200bwidth \x9b31m c1\n")
    return {"wrote": True}


def write_readonly(*paths: str) -> dict[str, object]:
    out: dict[str, object] = {}
    for path in paths:
        try:
            with open(os.path.join(path, "privsep-probe-write"), "wb") as fh:
                fh.write(b"x")
            out[path] = "wrote"
        except OSError as exc:
            out[path] = err(exc)
    return out


def mount_flags(device: str, writable_file: str) -> dict[str, object]:
    """Every mount's flags as the kernel reports them, and two attempts that only mount flags
    stop: opening a world-readable device node and writing a world-writable file, both in
    the bundle."""
    mounts: dict[str, list[str]] = {}
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            fields = line.split()
            mounts[fields[4]] = sorted(set(fields[5].split(",")) & {"ro", "nosuid", "nodev"})
    out: dict[str, object] = {"mounts": mounts}
    attempts = (("device", device, os.O_RDONLY), ("write", writable_file, os.O_WRONLY))
    for name, path, flags in attempts:
        try:
            os.close(os.open(path, flags))
            out[name] = "opened"
        except OSError as exc:
            out[name] = err(exc)
    with open("/dev/null", "wb") as null:  # the sandbox's own devices still work
        null.write(b"x")
    with open("/dev/urandom", "rb") as rnd:
        out["urandom"] = len(rnd.read(8))
    return out


def sleep(seconds: str) -> dict[str, object]:
    print("RESULT " + json.dumps({"sleeping": True}), flush=True)
    time.sleep(float(seconds))
    return {"slept": True}


ATTACKS = {
    name: obj
    for name, obj in globals().items()
    if callable(obj)
    and not name.startswith("_")
    and obj.__module__ == "__main__"
    and name not in ("err", "syscall", "nr", "try_read")
}


def main() -> None:
    attack = sys.argv[1]
    result = ATTACKS[attack](*sys.argv[2:])
    if result:
        print("RESULT " + json.dumps(result), flush=True)


main()
