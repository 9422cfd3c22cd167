"""``enter()``: the one ordered sequence that turns a fresh process into a sandbox.

Like bubblewrap's ``main()`` and OpenSSH's ``privsep_child_demote()``, the order lives in one
function that reads top to bottom; each step has a named exit code (``_steps.SetupStep``) and a
failure is reported on the status pipe with what was attempted, on what, and the OS reason.

Process layout. The PID namespace needs a fork after ``unshare`` (only children enter it).
In template mode as root the zygote does that fork (see ``_zygote``): it unshares the PID
namespace, forks the sandbox as PID 1 of it, reaps it and reports its exit, so a sandbox is a
single process. Everywhere else (spawn mode, user-namespace mode) ``enter()`` forks itself,
bubblewrap's layout minus its separate init::

    supervisor ── monitor (host PID namespace, waits, forwards SIGTERM, reports exit)
                     └── user process (PID 1 of a new PID namespace, sandbox uid, seccomp)

Either way the user process is PID 1 of its namespace, so when it exits the kernel kills
everything it left behind, double forked and ``setsid``'d or not, and when its parent (monitor
or zygote) dies it gets ``SIGKILL`` (``PR_SET_PDEATHSIG``, checked against the *lifeline*
pipe for the race before the prctl). PID 1 ignores signals it has no handler for, even from
the host, so the user process gets a ``SIGTERM`` handler that raises ``SystemExit(143)``;
``SIGKILL`` from outside always works.
"""

from __future__ import annotations

import contextlib
import functools
import os
import resource
import select
import signal
import sys
from collections.abc import Callable
from typing import NoReturn

from privsep.sandbox import _libc as libc
from privsep.sandbox._rootfs import HostLayout, finish_root, host_layout, prepare_root
from privsep.sandbox._steps import SetupStep, fail
from privsep.sandbox._wire import (
    CREDENTIAL_SOCKET_ENV,
    Plan,
    forbidden_env,
    write_exit_record,
)
from privsep.sandbox.privdrop import PrivilegeDropError, drop_privileges


class _StepFailed(Exception):
    """A check inside a step failed without an OS error."""


def enter(plan: Plan, status_fd: int, request_fd: int = -1, lifeline: int = -1) -> Plan:
    """Isolate the calling process; returns the final plan, only in the sandboxed user process.

    Runs as root (or, in user-namespace mode, as the supervisor's uid). On any failure the
    process exits with the step's code after writing an ``F`` record; the parent half of the
    PID-namespace fork never returns (it becomes the monitor).

    ``lifeline`` >= 0: the caller is already PID 1 of a new PID namespace whose parent (the
    zygote) reports its exit; no PID namespace is unshared and no monitor forked, and
    ``lifeline`` reads EOF once that parent is gone.

    ``request_fd`` >= 0 makes a *pre-warmed* sandbox: ``plan`` then only carries what the
    spec-independent steps need, and the process waits on ``request_fd`` for the real plan
    once its root skeleton is built (marked ``REQUEST`` below). That keeps the fork, the
    cgroup migration and most mounts off the launch path; the order of the steps is the same.
    """
    step = SetupStep.SETSID
    try:
        # 1. New session and process group: no controlling terminal, own group to signal.
        os.setsid()

        # Join the sandbox's cgroups before anything forks, so every process is accounted.
        step = SetupStep.CGROUP
        for procs in plan.cgroup_procs:
            _write_file(procs, "0")

        # 2. Close every fd but stdio and the status pipe (the credential socket is a path).
        step = SetupStep.CLOSE_FDS
        _close_fds_except(0, 1, 2, status_fd, *(fd for fd in (request_fd, lifeline) if fd >= 0))

        # 3. Environment: nothing inherited (the allow-list is applied once the plan is final).
        step = SetupStep.ENVIRONMENT
        os.environ.clear()

        # 4. Namespaces: mount, PID, IPC, UTS, cgroup (network below, once the policy is known),
        #    then a fork so the user process is PID 1 of the new PID namespace (unless the
        #    zygote already forked us into one).
        step = SetupStep.NAMESPACES
        _unshare_namespaces(plan, pid=lifeline < 0)
        step = SetupStep.PID_NAMESPACE
        if lifeline < 0:
            lifeline = _fork_monitor(status_fd)  # the parent half never returns
        elif os.getpid() != 1:
            raise _StepFailed(f"forked into a new PID namespace but pid is {os.getpid()}")
        step = SetupStep.FILESYSTEM
        bound = prepare_root(root_layout(plan))

        # Pre-warmed sandboxes wait here for the launch request (having made the likely
        # network namespace already); the others have their plan.
        step = SetupStep.NAMESPACES
        host_net = _prewarm_network(plan) if request_fd >= 0 else -1
        step = SetupStep.REQUEST
        plan = _receive_request(request_fd, plan)

        step = SetupStep.ENVIRONMENT
        _apply_environment(plan)
        step = SetupStep.NAMESPACES
        _network_and_hostname(plan, host_net)
        step = SetupStep.FILESYSTEM
        finish_root(
            bound=bound,
            ro_paths=plan.ro_paths,
            workdir=plan.workdir,
            socket=plan.socket,
            hidden_paths=plan.hidden_paths,
            tmp_bytes=plan.limits["tmp_bytes"],
        )
        os.chdir(plan.workdir)

        # 5. Resource limits (still privileged, so hard limits may be raised or lowered).
        step = SetupStep.RLIMITS
        _set_rlimits(plan.limits, privileged=not plan.userns)

        # 6. setgroups([]), setgid, setuid to the pool uid, with an empty capability bounding
        #    set (user-namespace mode: same uid, but every capability dropped).
        step = SetupStep.DROP_PRIVILEGES
        if plan.userns:
            libc.drop_all_capabilities()
        else:
            libc.drop_bounding_set()
            drop_privileges(plan.uid, plan.gid)

        # 7. Prove the drop holds: root must be out of reach, and so must CAP_SYS_ADMIN.
        step = SetupStep.VERIFY_DROP
        _verify_cannot_regain_root(plan)

        # 8. No new privileges through execve, then die with our parent (setuid cleared it).
        step = SetupStep.NO_NEW_PRIVS
        libc.set_no_new_privs()
        step = SetupStep.PDEATHSIG
        libc.set_pdeathsig(signal.SIGKILL)
        _check_lifeline(lifeline)
        os.close(lifeline)
        # The uid change made us non-dumpable, which also hides /proc/self/{environ,mem,fd}
        # from user code itself; nothing else runs as this uid, so give them back.
        libc.set_dumpable(True)

        # 9. The seccomp deny-list, last; then check it is really in force.
        step = SetupStep.SECCOMP
        libc.load_seccomp_bpf(plan.seccomp)
        if libc.raw_syscall(libc.SYS_UNSHARE, 0) != -1:  # -EPERM
            raise _StepFailed("unshare(0) was not refused after the seccomp filter was loaded")
    except (OSError, PrivilegeDropError, _StepFailed, ValueError) as exc:
        fail(status_fd, step, describe_error(exc))
    return plan


def describe_error(exc: BaseException) -> str:
    """ "what: reason" without Python's ``[Errno N]`` noise; names the file when there is one."""
    if isinstance(exc, OSError) and exc.strerror:
        if exc.filename is not None:
            return f"{exc.filename}: {exc.strerror}"
        return exc.strerror
    return str(exc)


def _write_file(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    except OSError as exc:
        raise OSError(exc.errno, f"write {path}: {exc.strerror}") from None
    finally:
        os.close(fd)


def _close_fds_except(*keep: int) -> None:
    previous = -1
    for fd in [*sorted(set(keep)), _max_fd()]:
        # Never an empty range: os.closerange(0, 0) becomes close_range(0, ~0) and closes all.
        if fd > previous + 1:
            os.closerange(previous + 1, fd)
        previous = fd
    stray = []
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd in keep:
            continue
        try:
            os.fstat(fd)  # the listing's own fd is closed again by now
        except OSError:
            continue
        stray.append(fd)
    if stray:
        raise _StepFailed(f"file descriptors survived closing: {sorted(stray)}")


def _max_fd() -> int:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def _apply_environment(plan: Plan) -> None:
    os.environ.clear()
    for name, value in plan.env.items():
        if forbidden_env(name):
            raise _StepFailed(f"refusing to pass {name} into a sandbox")
        os.environ[name] = value
    if plan.socket is not None:
        os.environ[CREDENTIAL_SOCKET_ENV] = plan.socket


def _unshare_namespaces(plan: Plan, *, pid: bool) -> None:
    flags = libc.CLONE_NEWNS | libc.CLONE_NEWIPC | libc.CLONE_NEWUTS | libc.CLONE_NEWCGROUP
    if pid:
        flags |= libc.CLONE_NEWPID
    if not plan.userns:
        libc.unshare(flags)
        return
    uid, gid = os.geteuid(), os.getegid()
    try:
        libc.unshare(flags | libc.CLONE_NEWUSER)
    except OSError as exc:
        raise OSError(
            exc.errno,
            f"cannot create user namespace for sandbox {plan.sandbox_id}: "
            f"{os.strerror(exc.errno or 0)}"
            " (hint: user.max_user_namespaces, kernel.unprivileged_userns_clone or "
            "kernel.apparmor_restrict_unprivileged_userns?)",
        ) from None
    # Our own /proc/self files are root-owned while we are non-dumpable: lift it briefly.
    libc.set_dumpable(True)
    _write_file("/proc/self/setgroups", "deny")
    _write_file("/proc/self/uid_map", f"{uid} {uid} 1")
    _write_file("/proc/self/gid_map", f"{gid} {gid} 1")
    libc.set_dumpable(False)


def _prewarm_network(plan: Plan) -> int:
    """Pre-warmed, as root: make the (usual) empty network namespace now, off the launch path.

    Returns an fd on the host's network namespace so a ``host`` plan can go back to it; -1
    when nothing was done (user-namespace mode cannot re-enter the host's namespace).
    """
    if plan.userns:
        return -1
    host_net = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    libc.unshare(libc.CLONE_NEWNET)
    libc.bring_up_loopback()
    return host_net


def _network_and_hostname(plan: Plan, host_net: int) -> None:
    """The network namespace (policy ``none``) and the host name, once the plan is final."""
    if host_net >= 0:  # already in a fresh network namespace
        if plan.network == "host":
            libc.setns(host_net, libc.CLONE_NEWNET)
        os.close(host_net)
    elif plan.network == "none":
        libc.unshare(libc.CLONE_NEWNET)
        libc.bring_up_loopback()
    libc.sethostname(plan.hostname)


def _receive_request(request_fd: int, warm: Plan) -> Plan:
    """The real plan of a pre-warmed sandbox (EOF first: the supervisor discarded us)."""
    if request_fd < 0:
        return warm
    chunks = []
    while chunk := os.read(request_fd, 65536):
        chunks.append(chunk)
    os.close(request_fd)
    if not chunks:
        os._exit(0)  # discarded before use: nothing to report
    if not warm.userns:
        os.setpriority(os.PRIO_PROCESS, 0, 0)  # warmed up at nice 10 (see _child.run)
    plan = Plan.from_wire(b"".join(chunks))
    if plan.userns != warm.userns or plan.cgroup_procs != warm.cgroup_procs:
        raise _StepFailed("launch request does not match the pre-warmed sandbox")
    return plan


def _fork_monitor(status_fd: int) -> int:
    """Fork; the parent becomes the monitor, the child (PID 1 of the new PID namespace, if
    one was unshared) continues setup with the lifeline's read end."""
    lifeline_r, lifeline_w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:
        os.close(lifeline_w)
        # Die with the monitor even while still privileged (set again after the uid drop).
        libc.set_pdeathsig(signal.SIGKILL)
        _check_lifeline(lifeline_r)
        return lifeline_r
    os.close(lifeline_r)
    _monitor(pid, status_fd)


def _monitor(pid: int, status_fd: int) -> NoReturn:
    """The outer half: forward termination requests, wait, report the exact outcome."""

    def forward(signum: int, _frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, forward)
    status: int | None = None
    usage: resource.struct_rusage | None = None
    with contextlib.suppress(ChildProcessError):
        _, status, usage = os.wait4(pid, 0)
    with contextlib.suppress(OSError):
        write_exit_record(status_fd, status, usage)
    if status is None:
        os._exit(int(SetupStep.PID_NAMESPACE))
    if os.WIFSIGNALED(status):
        os._exit(128 + os.WTERMSIG(status))
    os._exit(os.waitstatus_to_exitcode(status) & 0xFF)


def root_layout(plan: Plan) -> HostLayout:
    """The host paths the plan's view is built from; cached, so the zygote calls this before
    forking and its children inherit the answer."""
    return host_layout(plan.system_paths, _runtime_paths())


@functools.cache
def _runtime_paths() -> list[str]:
    """What this interpreter needs to keep importing: prefixes and absolute sys.path dirs.

    Computed once per process (the zygote's children inherit it); ``sys.path`` does not
    change before user code runs.
    """
    candidates = [sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix]
    candidates += [p for p in sys.path if p.startswith("/")]
    out = []
    for path in candidates:
        real = os.path.realpath(path)
        if os.path.isdir(real):
            out.append(real)
    return out


_RLIMITS = (
    ("cpu_seconds", resource.RLIMIT_CPU),
    ("memory_bytes", resource.RLIMIT_DATA),
    ("pids", resource.RLIMIT_NPROC),
    ("nofile", resource.RLIMIT_NOFILE),
    ("fsize_bytes", resource.RLIMIT_FSIZE),
)


def _set_rlimits(limits: dict[str, int], *, privileged: bool) -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    for key, which in _RLIMITS:
        value = limits.get(key)
        if value is None:
            continue
        # CPU: SIGXCPU at the soft limit (ignored by a PID 1 without a handler), SIGKILL a
        # second later at the hard limit.
        soft, hard = (value, value + 1) if which == resource.RLIMIT_CPU else (value, value)
        if not privileged:
            _, current_hard = resource.getrlimit(which)
            if current_hard != resource.RLIM_INFINITY:
                soft, hard = min(soft, current_hard), min(hard, current_hard)
        try:
            resource.setrlimit(which, (soft, hard))
        except (OSError, ValueError) as exc:
            raise OSError(0, f"setrlimit {key}={value}: {exc}") from None


def _verify_cannot_regain_root(plan: Plan) -> None:
    attempts: tuple[tuple[str, Callable[[], None]], ...] = (
        ("setuid(0)", lambda: os.setuid(0)),
        ("setresuid(0, 0, 0)", lambda: os.setresuid(0, 0, 0)),
        ("setgid(0)", lambda: os.setgid(0)),
        ("setgroups([0])", lambda: os.setgroups([0])),
    )
    for name, attempt in attempts:
        try:
            attempt()
        except OSError:
            continue
        raise _StepFailed(f"{name} succeeded after the privilege drop")
    if 0 in os.getresuid() or (not plan.userns and (0 in os.getresgid() or os.getgroups())):
        raise _StepFailed(f"ids still privileged: {os.getresuid()} {os.getresgid()}")
    try:
        libc.sethostname(plan.hostname)
    except OSError:
        pass
    else:
        raise _StepFailed("sethostname succeeded: CAP_SYS_ADMIN was not dropped")


def _check_lifeline(lifeline: int) -> None:
    """Fail if our parent died before PR_SET_PDEATHSIG was in place (the classic race)."""
    if lifeline_cut(lifeline):
        raise _StepFailed("the parent process (monitor or zygote) died during setup")


def lifeline_cut(lifeline: int) -> bool:
    """Whether the lifeline pipe is readable: its only writer, our parent, is gone.

    Polled, not read, so a lifeline shared by all the zygote's children is never changed.
    """
    poller = select.poll()
    poller.register(lifeline, select.POLLIN)
    return bool(poller.poll(0))


UNSAFE_BANNER = (
    "privsep: UNSAFE-INLINE MODE: this child runs WITHOUT namespaces, uid drop or seccomp, "
    "with the supervisor's privileges. Debugging only; never use it for untrusted code.\n"
)


def enter_unsafe_inline(plan: Plan, status_fd: int) -> None:
    """The explicit ``unsafe-inline`` debug mode: hygiene only, and a banner in the log.

    Still a fresh interpreter or a zygote fork (no supervisor memory), still a new session,
    closed fds, the allow-listed environment, a monitor and rlimits; nothing else.
    """
    step = SetupStep.SETSID
    try:
        os.setsid()
        step = SetupStep.CLOSE_FDS
        _close_fds_except(0, 1, 2, status_fd)
        step = SetupStep.ENVIRONMENT
        _apply_environment(plan)
        step = SetupStep.PID_NAMESPACE
        os.close(_fork_monitor(status_fd))  # a monitor still reports the exact outcome
        step = SetupStep.RLIMITS
        _set_rlimits(plan.limits, privileged=False)
        os.chdir(plan.workdir)
        os.write(2, UNSAFE_BANNER.encode())
    except (OSError, _StepFailed, ValueError) as exc:
        fail(status_fd, step, describe_error(exc))
