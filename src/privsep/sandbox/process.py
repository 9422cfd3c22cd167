"""The process backend: one ``SandboxSpec`` in, one namespaced, uid-dropped child out.

``ProcessBackend.launch(spec)`` resolves everything the child needs (a pool uid, its work dir,
its cgroups, the compiled seccomp program) into a plan, starts the child in one of two modes
and returns a :class:`ProcessHandle`:

* ``spawn``: exec a fresh ``python -I -m privsep.sandbox._child`` (the reference mode);
* ``template``: ask the zygote (see ``_zygote``) to fork one.

Either way the child never holds a copy of the supervisor's memory, and runs the same
``enter()`` sequence. The backend's reactor thread then captures output, enforces the
wall-clock limit (SIGTERM, then SIGKILL of everything after the grace period, through the pidfd
and the cgroup), and on exit frees the uid and the cgroups.

As root, sandboxes run as pool uids. As another user, they run in an unprivileged user
namespace (same host uid, no capabilities), or the backend refuses to start. ``unsafe_inline``
(no isolation at all, for debugging) must be asked for by name and is loud.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import select
import signal
import stat
import subprocess
import sys
import tempfile
import threading
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Literal, NamedTuple

from privsep.sandbox._reactor import Reactor
from privsep.sandbox._reactor_handle import ReactorHandle
from privsep.sandbox._spawn import devnull_fd, spawn_python
from privsep.sandbox._steps import SETUP_CODES, SetupStep
from privsep.sandbox._template import ZygoteClient
from privsep.sandbox._wire import EXITED, FAILED, Plan, RecordParser
from privsep.sandbox.cgroups import CgroupManager, SandboxCgroup
from privsep.sandbox.seccomp_policy import compile_filter
from privsep.sandbox.spec import SandboxSpec
from privsep.sandbox.status import ExitReason, ExitStatus, signal_name
from privsep.sandbox.uidpool import UidPool

log = logging.getLogger("privsep.sandbox")

LaunchMode = Literal["spawn", "template"]
DEFAULT_SYSTEM_PATHS: tuple[str, ...] = (
    "/usr",
    "/bin",
    "/sbin",
    "/lib",
    "/lib32",
    "/lib64",
    "/libx32",
    "/etc",
)
_READ_CHUNK = 65536
_READS_PER_EVENT = 16
_DRAIN_AFTER_EXIT = 2.0


class SandboxError(RuntimeError):
    """Base of the sandbox backend's errors."""


class SandboxUnavailable(SandboxError):
    """This host or user cannot run sandboxes; the message says why and what to change."""


class SandboxLaunchError(SandboxError):
    """One launch failed before a child existed (nothing is left running)."""


def set_non_dumpable() -> None:
    """Make the calling process non-dumpable (``PR_SET_DUMPABLE=0``).

    The supervisor calls this at start: it makes ``/proc/<pid>/mem``, ``environ``, ``fd`` and
    ptrace attach root-only, and disables core dumps that would write its secrets to disk.
    """
    from privsep.sandbox import _libc

    _libc.set_dumpable(False)


def userns_available(python: str = sys.executable) -> tuple[bool, str]:
    """Whether this user can create a user namespace with mount and PID namespaces.

    Probed in a throwaway interpreter (never by forking the supervisor).
    """
    code = (
        "from privsep.sandbox import _libc as l\n"
        "l.unshare(l.CLONE_NEWUSER | l.CLONE_NEWNS | l.CLONE_NEWPID)\n"
    )
    try:
        proc = subprocess.run(
            [python, "-I", "-c", code],
            capture_output=True,
            text=True,
            timeout=30,
            env={},
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, str(exc)
    if proc.returncode == 0:
        return True, ""
    lines = proc.stderr.strip().splitlines()
    return False, lines[-1] if lines else f"exit {proc.returncode}"


class ProcessBackend:
    """Launches sandboxes as isolated processes. One per supervisor; thread-safe."""

    def __init__(
        self,
        *,
        launch_mode: LaunchMode = "spawn",
        uid_pool: UidPool | None = None,
        log_dir: str | None = None,
        system_paths: Sequence[str] = DEFAULT_SYSTEM_PATHS,
        use_cgroups: bool = True,
        python: str = sys.executable,
        zygote_preload: Sequence[str] | None = None,
        prewarm: int = 4,
        unsafe_inline: bool = False,
    ) -> None:
        if launch_mode not in ("spawn", "template"):
            raise ValueError(f"launch_mode must be spawn or template, not {launch_mode!r}")
        self.launch_mode: LaunchMode = launch_mode
        self.unsafe_inline = unsafe_inline
        self._python = python
        self._system_paths = list(system_paths)
        self._log_dir = log_dir or tempfile.mkdtemp(prefix="privsep-sandbox-logs-")
        self.userns = False
        if unsafe_inline:
            log.warning(
                "privsep: UNSAFE-INLINE sandbox backend: user code will run WITHOUT isolation, "
                "with the supervisor's privileges. For debugging only."
            )
        elif os.geteuid() != 0:
            ok, why = userns_available(python)
            if not ok:
                raise SandboxUnavailable(
                    f"privsep: cannot sandbox as uid {os.geteuid()}: not root and cannot create "
                    f"a user namespace ({why}). Run the supervisor as root, or allow "
                    "unprivileged user namespaces (user.max_user_namespaces > 0, "
                    "kernel.unprivileged_userns_clone=1, "
                    "kernel.apparmor_restrict_unprivileged_userns=0)."
                )
            self.userns = True
        self._pool = uid_pool if uid_pool is not None else UidPool(100_000, 1000)
        self._seccomp = b"" if unsafe_inline else compile_filter()
        self._cgroups = CgroupManager() if use_cgroups and os.geteuid() == 0 else None
        self._launcher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="privsep-launch")
        self._reactor = Reactor()
        self._zygote: ZygoteClient | None = None
        if launch_mode == "template":
            self._zygote = ZygoteClient(
                python=python, launcher=self._launcher, preload=zygote_preload
            )
            self._zygote.start()
        self._handles: set[ProcessHandle] = set()
        self._lock = threading.Lock()
        self._closed = False
        # Pre-warmed sandboxes (template mode): forked, in their cgroup, root skeleton built,
        # waiting for a plan. Filled by their own thread, never on the launch path.
        self._prewarm = prewarm if self._zygote is not None and not unsafe_inline else 0
        self._warm: deque[_Warm] = deque()
        self._warm_seq = itertools.count()
        self._warm_failures = 0
        self._prewarmer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="privsep-prewarm")
        self._stale_cgroups: list[SandboxCgroup] = []
        self._refill_warm()

    def describe(self) -> str:
        """One line for the supervisor's startup log: how children are isolated here."""
        if self.unsafe_inline:
            return "process backend: UNSAFE-INLINE (no isolation)"
        who = (
            "user namespace (no pool uids)"
            if self.userns
            else (f"root, uid pool {self._pool.first}..{self._pool.first + self._pool.count - 1}")
        )
        cg = self._cgroups.describe() if self._cgroups else "cgroups off"
        return f"process backend ({self.launch_mode}): {who}; {cg}"

    @property
    def cgroup_controllers(self) -> frozenset[str]:
        """What per-sandbox cgroup control is in force: memory, pids, freezer, kill."""
        if self._cgroups is None or self.unsafe_inline:
            return frozenset()
        return self._cgroups.controllers

    @property
    def zygote_pid(self) -> int | None:
        """The template zygote's pid (template mode, once started)."""
        return self._zygote.pid if self._zygote is not None else None

    @property
    def _has_monitor(self) -> bool:
        """Whether each sandbox has a monitor process (all but template mode as root).

        As root the zygote forks each sandbox straight into a new PID namespace and reaps it
        itself (see ``_zygote``); spawn and user-namespace mode keep ``enter()``'s monitor.
        """
        return self._zygote is None or self.userns or self.unsafe_inline

    def warm_pids(self) -> list[int]:
        """Pids of the pre-warmed sandboxes waiting for a request (diagnostics)."""
        with self._lock:
            return [w.pid for w in self._warm]

    @property
    def uid_pool(self) -> UidPool:
        """The pool sandboxes draw their uids from."""
        return self._pool

    def launch(self, spec: SandboxSpec) -> ProcessHandle:
        """Start one sandbox for ``spec``. Raises :class:`SandboxLaunchError` on failure."""
        with self._lock:
            if self._closed:
                raise SandboxLaunchError("the sandbox backend is closed")
        uses_pool = not (self.userns or self.unsafe_inline)
        uid = self._pool.acquire() if uses_pool else os.geteuid()
        gid = uid if uses_pool else os.getegid()
        log_fd = -1
        try:
            workdir = _prepare_workdir(spec.workdir, uid, gid, chown=uses_pool)
            socket_path = _prepare_socket(spec.credential_socket, uid, gid, chown=uses_pool)
            log_path = spec.log_path or os.path.join(self._log_dir, f"{spec.sandbox_id}.log")
            log_fd = os.open(
                log_path,
                os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o600,
            )
            plan = Plan(
                sandbox_id=spec.sandbox_id,
                kind=spec.kind,
                entry=spec.entry_point,
                argv=list(spec.argv),
                payload=spec.payload,
                workdir=workdir,
                env=dict(spec.env),
                limits=spec.limits.to_wire(),
                network=spec.network,
                ro_paths=[os.path.realpath(p) for p in (*spec.code_paths, *spec.bundle_paths)],
                hidden_paths=[os.path.realpath(p) for p in spec.hidden_paths],
                system_paths=self._system_paths,
                socket=socket_path,
                uid=uid,
                gid=gid,
                cgroup_procs=[],
                seccomp=self._seccomp,
                parent_pid=os.getpid(),
                hostname=f"privsep-{spec.kind}",
                userns=self.userns,
                unsafe_inline=self.unsafe_inline,
            )
            started = self._start_warm(spec, plan) or self._start_cold(spec, plan)
        except Exception as exc:
            if log_fd >= 0:
                os.close(log_fd)
            if uses_pool:
                self._pool.release(uid)
            if isinstance(exc, (OSError, ValueError, RuntimeError)):
                raise SandboxLaunchError(
                    f"privsep: cannot launch sandbox {spec.sandbox_id}: {exc}"
                ) from exc
            raise
        handle = ProcessHandle(
            backend=self,
            spec=spec,
            pid=started.pid,
            pidfd=started.pidfd,
            is_child=started.is_child,
            uid=uid if uses_pool else None,
            cgroup=started.cgroup,
            out_r=started.out_r,
            status_r=started.status_r,
            log_fd=log_fd,
            log_path=log_path,
        )
        with self._lock:
            self._handles.add(handle)
        self._reactor.call_soon(handle._attach)
        return handle

    def _start_cold(self, spec: SandboxSpec, plan: Plan) -> _Started:
        """Fork (template) or exec (spawn) a new child that runs ``enter()`` from the start."""
        cgroup: SandboxCgroup | None = None
        fds: list[int] = []
        try:
            if self._cgroups is not None and self._cgroups.available and not self.unsafe_inline:
                cgroup = self._cgroups.create(
                    f"{spec.sandbox_id}-{os.getpid()}",
                    memory_bytes=spec.limits.memory_bytes,
                    pids=_cgroup_pids(spec, monitor=self._has_monitor),
                )
                plan.cgroup_procs = cgroup.procs
            out_r, out_w = os.pipe2(os.O_CLOEXEC)
            fds += [out_r, out_w]
            status_r, status_w = os.pipe2(os.O_CLOEXEC)
            fds += [status_r, status_w]
            if self._zygote is not None:
                pid, pidfd = self._zygote.launch(plan.to_wire(), [out_w, status_w])
                is_child = False
            else:
                pid, pidfd, is_child = self._spawn(plan, out_w, status_w)
        except BaseException:
            for fd in fds:
                os.close(fd)
            if cgroup is not None:
                cgroup.remove()
            raise
        os.close(out_w)
        os.close(status_w)
        return _Started(pid, pidfd, is_child, cgroup, out_r, status_r)

    def _spawn(self, plan: Plan, out_w: int, status_w: int) -> tuple[int, int, bool]:
        data = plan.to_wire()
        if len(data) > 60_000:
            raise SandboxLaunchError("launch plan too large for the pipe")
        plan_r, plan_w = os.pipe2(os.O_CLOEXEC)
        try:
            os.write(plan_w, data)
            os.close(plan_w)
            plan_w = -1
            null = devnull_fd()
            try:
                args = ["-m", "privsep.sandbox._child", "3", "4"]
                fds = {0: null, 1: out_w, 2: out_w, 3: plan_r, 4: status_w}
                pid = self._launcher.submit(spawn_python, self._python, args, fds).result()
            finally:
                os.close(null)
        finally:
            os.close(plan_r)
            if plan_w >= 0:
                os.close(plan_w)
        return pid, os.pidfd_open(pid), True

    # -- pre-warmed sandboxes (template mode) ----------------------------------------------

    def _start_warm(self, spec: SandboxSpec, plan: Plan) -> _Started | None:
        """Hand ``plan`` to a pre-warmed sandbox, if one is ready; ``None`` otherwise."""
        while (warm := self._take_warm()) is not None:
            try:
                if warm.cgroup is not None:
                    warm.cgroup.set_limits(
                        memory_bytes=spec.limits.memory_bytes,
                        pids=_cgroup_pids(spec, monitor=self._has_monitor),
                    )
                plan.cgroup_procs = warm.procs
                _write_all(warm.request_w, plan.to_wire())
            except OSError as exc:
                log.warning("privsep: pre-warmed sandbox %d unusable: %s", warm.pid, exc)
                self._discard_warm(warm)
                continue
            os.close(warm.request_w)
            # Refill a moment later, not while this sandbox is still starting up.
            self._reactor.call_soon(self._refill_later)
            return _Started(warm.pid, warm.pidfd, False, warm.cgroup, warm.out_r, warm.status_r)
        plan.cgroup_procs = []
        return None

    def _take_warm(self) -> _Warm | None:
        while True:
            with self._lock:
                if not self._warm:
                    self._refill_warm()
                    return None
                warm = self._warm.popleft()
            if not _readable(warm.pidfd, warm.status_r):
                return warm
            why = _read_failure(warm.status_r) or "exited while waiting"
            log.warning("privsep: pre-warmed sandbox %d failed: %s", warm.pid, why)
            self._warm_failures += 1
            self._discard_warm(warm)

    def _refill_later(self) -> None:
        self._reactor.call_later(0.05, self._refill_warm)

    def _refill_warm(self) -> None:
        if self._prewarm and not self._closed and self._warm_failures < _MAX_WARM_FAILURES:
            with contextlib.suppress(RuntimeError):  # executor shut down: we are closing
                self._prewarmer.submit(self._fill_warm)

    def _fill_warm(self) -> None:
        """Runs on the pre-warm thread: top the pool up to ``prewarm`` entries."""
        while True:
            with self._lock:
                if self._closed or len(self._warm) >= self._prewarm:
                    return
            try:
                warm = self._new_warm()
            except (OSError, RuntimeError) as exc:
                self._warm_failures += 1
                log.warning("privsep: cannot pre-warm a sandbox: %s", exc)
                return
            with self._lock:
                if not self._closed:
                    self._warm.append(warm)
                    continue
            self._discard_warm(warm)
            return

    def _new_warm(self) -> _Warm:
        if self._zygote is None:
            raise RuntimeError("only template mode pre-warms sandboxes")
        n = next(self._warm_seq)
        cgroup: SandboxCgroup | None = None
        fds: list[int] = []
        try:
            if self._cgroups is not None and self._cgroups.available:
                cgroup = self._cgroups.create(f"warm{n}-{os.getpid()}")
            out_r, out_w = os.pipe2(os.O_CLOEXEC)
            fds += [out_r, out_w]
            status_r, status_w = os.pipe2(os.O_CLOEXEC)
            fds += [status_r, status_w]
            request_r, request_w = os.pipe2(os.O_CLOEXEC)
            fds += [request_r, request_w]
            plan = self._warm_plan(n, cgroup.procs if cgroup else [])
            pid, pidfd = self._zygote.launch(plan.to_wire(), [out_w, status_w, request_r])
        except BaseException:
            for fd in fds:
                os.close(fd)
            if cgroup is not None:
                cgroup.remove()
            raise
        for fd in (out_w, status_w, request_r):
            os.close(fd)
        self._warm_failures = 0
        return _Warm(pid, pidfd, cgroup, out_r, status_r, request_w)

    def _warm_plan(self, n: int, procs: list[str]) -> Plan:
        """What a pre-warmed child needs before its request: no spec field that matters."""
        return Plan(
            sandbox_id=f"warm{n}",
            kind="task",
            entry="",
            argv=[],
            payload=b"",
            workdir="/",
            env={},
            limits={"tmp_bytes": 64 << 20, "nofile": 1024},
            network="none",
            ro_paths=[],
            hidden_paths=[],
            system_paths=self._system_paths,
            socket=None,
            uid=-1,
            gid=-1,
            cgroup_procs=procs,
            seccomp=b"",
            parent_pid=0,
            hostname="privsep-warm",
            userns=self.userns,
            unsafe_inline=False,
        )

    def _discard_warm(self, warm: _Warm) -> None:
        for fd in (warm.request_w, warm.out_r, warm.status_r, warm.pidfd):
            with contextlib.suppress(OSError):
                os.close(fd)
        if warm.cgroup is not None:
            warm.cgroup.kill()
            if not warm.cgroup.remove(attempts=50, delay=0.01):
                with self._lock:
                    self._stale_cgroups.append(warm.cgroup)  # retried at close()

    def _finished(self, handle: ProcessHandle, *, release_uid: bool) -> None:
        if handle.uid is not None and release_uid:
            self._pool.release(handle.uid)
        with self._lock:
            self._handles.discard(handle)

    def running(self) -> list[ProcessHandle]:
        """Handles of sandboxes not yet finished."""
        with self._lock:
            return list(self._handles)

    def close(self, grace: float = 1.0) -> None:
        """Kill every running sandbox, wait for them, stop the zygote and the reactor."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            handles = list(self._handles)
        self._prewarmer.shutdown(wait=True)
        with self._lock:
            warm, self._warm = list(self._warm), deque()
        for entry in warm:
            self._discard_warm(entry)
        for handle in handles:
            handle.kill(grace=grace)
        for handle in handles:
            handle.wait(timeout=grace + 10.0)
        if self._zygote is not None:
            self._zygote.close()
        for cgroup in self._stale_cgroups:  # the zygote has reaped everything by now
            if not cgroup.remove(attempts=100, delay=0.01):
                log.error("privsep: cannot remove sandbox cgroups %s", cgroup.dirs)
        self._reactor.stop()
        self._launcher.shutdown(wait=True)

    def __enter__(self) -> ProcessBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_MAX_WARM_FAILURES = 3


class _Started(NamedTuple):
    pid: int
    pidfd: int
    is_child: bool
    cgroup: SandboxCgroup | None
    out_r: int
    status_r: int


class _Warm(NamedTuple):
    pid: int
    pidfd: int
    cgroup: SandboxCgroup | None
    out_r: int
    status_r: int
    request_w: int

    @property
    def procs(self) -> list[str]:
        return self.cgroup.procs if self.cgroup is not None else []


def _cgroup_pids(spec: SandboxSpec, *, monitor: bool) -> int | None:
    """``pids.max``: the spec's limit, plus the monitor process where there is one."""
    if spec.limits.pids is None:
        return None
    return spec.limits.pids + (1 if monitor else 0)


def _readable(*fds: int) -> bool:
    """Whether any of ``fds`` is readable now (poll, not select: fds may be above 1024)."""
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _read_failure(status_r: int) -> str | None:
    """The ``F`` record a failed pre-warmed child left, if any."""
    os.set_blocking(status_r, False)
    try:
        data = os.read(status_r, 65536)
    except OSError:
        return None
    for kind, payload in RecordParser().feed(data):
        if kind == FAILED and isinstance(payload, tuple) and len(payload) == 2:
            code, detail = payload
            step = SetupStep(code) if code in SETUP_CODES else SetupStep.BOOTSTRAP
            return f"{step.message}: {detail}"
    return None


def _prepare_workdir(path: str, uid: int, gid: int, *, chown: bool) -> str:
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


def _prepare_socket(path: str | None, uid: int, gid: int, *, chown: bool) -> str | None:
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


def _release_workdir(path: str) -> None:
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


class ProcessHandle(ReactorHandle):
    """Handle on one process-backend sandbox. Its state is owned by the reactor thread."""

    def __init__(
        self,
        *,
        backend: ProcessBackend,
        spec: SandboxSpec,
        pid: int,
        pidfd: int,
        is_child: bool,
        uid: int | None,
        cgroup: SandboxCgroup | None,
        out_r: int,
        status_r: int,
        log_fd: int,
        log_path: str,
    ) -> None:
        super().__init__(
            reactor=backend._reactor,
            spec=spec,
            pid=pid,
            pidfd=pidfd,
            log_fd=log_fd,
            log_path=log_path,
        )
        self._backend = backend
        self._is_child = is_child
        self.uid = uid
        self._cgroup = cgroup
        self._out_r = out_r
        self._status_r = status_r
        self._exit_record: tuple[int | None, float, float, int] | None = None
        self._monitor: tuple[str, int] | None = None  # ("exit", code) | ("signal", n); spawn

    def __repr__(self) -> str:
        return f"<ProcessHandle {self.sandbox_id} pid={self._pid} status={self._status}>"

    # -- reactor thread ----------------------------------------------------------------------

    def _attach(self) -> None:
        for fd in (self._out_r, self._status_r):
            os.set_blocking(fd, False)
        self._reactor.add_reader(self._out_r, self._on_output)
        self._reactor.add_reader(self._status_r, self._on_status)
        self._reactor.add_reader(self._pidfd, self._on_exit)
        wall = self.spec.limits.wall_seconds
        self._timers.append(
            self._reactor.call_later(wall, lambda: self._terminate(ExitReason.TIMEOUT, None))
        )

    def _on_output(self, fd: int) -> None:
        for _ in range(_READS_PER_EVENT):
            try:
                data = os.read(fd, _READ_CHUNK)
            except BlockingIOError:
                return
            if not data:
                self._close_output()
                return
            self._capture.feed(data)

    def _close_output(self) -> None:
        if self._out_open:
            self._out_open = False
            self._reactor.remove_reader(self._out_r)
            os.close(self._out_r)
            self._capture.finish()
            self._maybe_finish()

    def _on_status(self, fd: int) -> None:
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return
        if not data:
            self._close_status()
            return
        for kind, payload in self._parser.feed(data):
            if kind == EXITED and isinstance(payload, tuple) and len(payload) == 4:
                self._exit_record = payload
            else:
                self._on_record(kind, payload)

    def _close_status(self) -> None:
        if self._status_open:
            self._status_open = False
            self._reactor.remove_reader(self._status_r)
            os.close(self._status_r)
            self._maybe_finish()

    def _on_exit(self, fd: int) -> None:
        self._reactor.remove_reader(fd)
        if self._is_child:
            try:
                info = os.waitid(os.P_PIDFD, fd, os.WEXITED | os.WNOHANG)
            except ChildProcessError:
                info = None  # someone else reaped it; the X record still tells us
            if info is not None:
                exited = info.si_code == os.CLD_EXITED
                self._monitor = ("exit" if exited else "signal", info.si_status)
        os.close(fd)
        self._pidfd = -1
        self._exited = True
        self._running.set()
        for timer in self._timers:
            timer.cancel()
        self._timers = [self._reactor.call_later(_DRAIN_AFTER_EXIT, self._force_finish)]
        # Anything left in the sandbox (there should be nothing: the PID namespace is gone).
        if self._cgroup is not None:
            self._cgroup.kill()
        self._maybe_finish()

    def _hard_kill(self) -> None:
        if self._exited:
            return
        self._signal(signal.SIGKILL)
        if self._cgroup is not None:
            self._cgroup.kill()

    def _force_finish(self) -> None:
        self._close_output()
        self._close_status()

    def _maybe_finish(self) -> None:
        if self._done.is_set() or not self._exited or self._out_open or self._status_open:
            return
        for timer in self._timers:
            timer.cancel()
        self._timers = []
        self._status = self._compute_status()
        with contextlib.suppress(OSError):
            os.close(self._log_fd)
        clean = True
        if self._cgroup is not None and not self._cgroup.remove(attempts=20, delay=0.005):
            # Something of this sandbox outlived it: its uid must not go to the next one.
            clean = False
            log.error(
                "privsep: sandbox %s left processes in its cgroups %s; uid %s is quarantined",
                self.sandbox_id,
                self._cgroup.dirs,
                self.uid,
            )
        if self.uid is not None:
            _release_workdir(self.spec.workdir)
        self._backend._finished(self, release_uid=clean)
        self._complete()

    def _compute_status(self) -> ExitStatus:
        lim = self.spec.limits
        if not self._ready:
            if self._failure is not None:
                step_code, detail = self._failure
                step = SetupStep(step_code) if step_code in SETUP_CODES else SetupStep.BOOTSTRAP
                return ExitStatus(
                    ExitReason.SETUP_FAILED, f"{step.message}: {detail}", setup_step=step
                )
            if self._termination is None:
                monitor = self._monitor
                if monitor is not None and monitor[0] == "exit" and monitor[1] in SETUP_CODES:
                    step = SetupStep(monitor[1])
                    return ExitStatus(ExitReason.SETUP_FAILED, step.message, setup_step=step)
                return ExitStatus(
                    ExitReason.SETUP_FAILED,
                    f"sandbox died during setup ({self._describe_monitor()})",
                    setup_step=SetupStep.BOOTSTRAP,
                )
        raw: int | None = None
        cpu: float | None = None
        maxrss: int | None = None
        if self._exit_record is not None:
            raw, utime, stime, maxrss = self._exit_record
            cpu = utime + stime
        code: int | None = None
        sig: int | None = None
        if raw is not None:
            if os.WIFSIGNALED(raw):
                sig = os.WTERMSIG(raw)
            else:
                code = os.waitstatus_to_exitcode(raw)

        def result(reason: ExitReason, detail: str) -> ExitStatus:
            return ExitStatus(
                reason, detail, exit_code=code, signal=sig, cpu_seconds=cpu, max_rss_kib=maxrss
            )

        if self._termination is ExitReason.TIMEOUT:
            return result(
                ExitReason.TIMEOUT,
                f"wall-clock limit of {lim.wall_seconds:g} s reached; sandbox killed",
            )
        if self._termination is ExitReason.KILLED:
            return result(ExitReason.KILLED, "killed on request")
        if self._cgroup is not None and self._cgroup.oom_killed():
            return result(
                ExitReason.MEMORY_LIMIT,
                f"memory limit of {lim.memory_bytes} bytes reached (OOM kill in the sandbox)",
            )
        if raw is None:
            return result(
                ExitReason.LOST,
                "the process reaping the sandbox (monitor or zygote) died without reporting "
                f"({self._describe_monitor()})",
            )
        if sig is not None:
            if lim.cpu_seconds is not None and cpu is not None and cpu >= lim.cpu_seconds:
                return result(
                    ExitReason.CPU_LIMIT,
                    f"CPU limit of {lim.cpu_seconds} s reached ({signal_name(sig)})",
                )
            hint = " (perhaps out of memory?)" if sig == signal.SIGKILL else ""
            return result(ExitReason.SIGNALED, f"killed by {signal_name(sig)}{hint}")
        if code == 0:
            return result(ExitReason.SUCCEEDED, "exited with code 0")
        return result(ExitReason.FAILED, f"exited with code {code}")

    def _describe_monitor(self) -> str:
        if self._monitor is None:
            return "status unknown"
        kind, value = self._monitor
        if kind == "signal":
            return f"monitor killed by {signal_name(value)}"
        return f"monitor exited with code {value}"
