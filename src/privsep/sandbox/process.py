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
import subprocess
import sys
import tempfile
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Literal, NamedTuple

from privsep.sandbox._backend_base import BackendBase
from privsep.sandbox._classify import failed_step
from privsep.sandbox._hostprep import open_log, prepare_socket, prepare_workdir, write_all
from privsep.sandbox._process_handle import ProcessHandle
from privsep.sandbox._reactor import Reactor
from privsep.sandbox._reactor_handle import Launched
from privsep.sandbox._spawn import devnull_fd, spawn_python
from privsep.sandbox._template import ZygoteClient
from privsep.sandbox._wire import FAILED, Plan, RecordParser
from privsep.sandbox.cgroups import CgroupManager, SandboxCgroup
from privsep.sandbox.errors import SandboxError, SandboxLaunchError, SandboxUnavailable
from privsep.sandbox.handle import SandboxBackend
from privsep.sandbox.seccomp_policy import compile_filter
from privsep.sandbox.spec import SandboxSpec
from privsep.sandbox.uidpool import UidPool

__all__ = [
    # The handle and the errors live in modules of their own; they are named here as well
    # because the package's lazy exports (``privsep.sandbox.__init__``) resolve them here.
    "ProcessBackend",
    "ProcessHandle",
    "SandboxError",
    "SandboxLaunchError",
    "SandboxUnavailable",
    "set_non_dumpable",
    "userns_available",
]

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


class ProcessBackend(BackendBase[ProcessHandle]):
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
        super().__init__(Reactor())
        self._zygote: ZygoteClient | None = None
        if launch_mode == "template":
            self._zygote = ZygoteClient(
                python=python, launcher=self._launcher, preload=zygote_preload
            )
            self._zygote.start()
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

    def unenforced_limits(self) -> tuple[str, ...]:
        """The whole-sandbox limits no writable cgroup controller here can enforce: ``memory``
        and ``pids`` (a read-only or missing hierarchy, as in many containers). Each process
        still has its rlimits, and the PID namespace still ends with the sandbox."""
        return tuple(c for c in ("memory", "pids") if c not in self.cgroup_controllers)

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
        self._ensure_open()
        uses_pool = not (self.userns or self.unsafe_inline)
        uid = self._pool.acquire() if uses_pool else os.geteuid()
        gid = uid if uses_pool else os.getegid()
        log_fd = -1
        try:
            workdir = prepare_workdir(spec.workdir, uid, gid, chown=uses_pool)
            socket_path = prepare_socket(spec.credential_socket, uid, gid, chown=uses_pool)
            log_path = spec.log_path or os.path.join(self._log_dir, f"{spec.sandbox_id}.log")
            log_fd = open_log(log_path)
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
            launched=Launched(
                spec,
                uid if uses_pool else None,
                started.pid,
                started.pidfd,
                started.out_r,
                started.status_r,
                log_fd,
                log_path,
            ),
            reactor=self._reactor,
            is_child=started.is_child,
            cgroup=started.cgroup,
            finished=self._finished,
        )
        return self._watch(handle)

    def _start_cold(self, spec: SandboxSpec, plan: Plan) -> _Started:
        """Fork (template) or exec (spawn) a new child that runs ``enter()`` from the start."""
        with _Pending() as pending:
            if self._cgroups is not None and self._cgroups.available and not self.unsafe_inline:
                pending.cgroup = self._cgroups.create(
                    f"{spec.sandbox_id}-{os.getpid()}",
                    memory_bytes=spec.limits.memory_bytes,
                    pids=_cgroup_pids(spec, monitor=self._has_monitor),
                )
                plan.cgroup_procs = pending.cgroup.procs
            out_r, out_w = pending.pipe()
            status_r, status_w = pending.pipe()
            if self._zygote is not None:
                pid, pidfd = self._zygote.launch(plan.to_wire(), [out_w, status_w])
                is_child = False
            else:
                pid, pidfd, is_child = self._spawn(plan, out_w, status_w)
        os.close(out_w)
        os.close(status_w)
        return _Started(pid, pidfd, is_child, pending.cgroup, out_r, status_r)

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
                write_all(warm.request_w, plan.to_wire())
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
        with _Pending() as pending:
            if self._cgroups is not None and self._cgroups.available:
                pending.cgroup = self._cgroups.create(f"warm{n}-{os.getpid()}")
            out_r, out_w = pending.pipe()
            status_r, status_w = pending.pipe()
            request_r, request_w = pending.pipe()
            plan = self._warm_plan(n, pending.procs)
            pid, pidfd = self._zygote.launch(plan.to_wire(), [out_w, status_w, request_r])
        for fd in (out_w, status_w, request_r):
            os.close(fd)
        self._warm_failures = 0
        return _Warm(pid, pidfd, pending.cgroup, out_r, status_r, request_w)

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

    def _finished(self, handle: ProcessHandle, release_uid: bool) -> None:
        if handle.uid is not None and release_uid:
            self._pool.release(handle.uid)
        self._forget(handle)

    def close(self, grace: float = 1.0) -> None:
        """Kill every running sandbox, wait for them, stop the zygote and the reactor."""
        handles = self._mark_closed()
        if handles is None:
            return
        self._prewarmer.shutdown(wait=True)
        with self._lock:
            warm, self._warm = list(self._warm), deque()
        for entry in warm:
            self._discard_warm(entry)
        self._end_all(handles, grace, wait=grace + 10.0)
        if self._zygote is not None:
            self._zygote.close()
        for cgroup in self._stale_cgroups:  # the zygote has reaped everything by now
            if not cgroup.remove(attempts=100, delay=0.01):
                log.error("privsep: cannot remove sandbox cgroups %s", cgroup.dirs)
        self._reactor.stop()
        self._launcher.shutdown(wait=True)


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


class _Pending:
    """The pipes and cgroup made for a child that is not started yet: a context manager that
    closes and removes them all if starting the child fails, and leaves them otherwise."""

    def __init__(self) -> None:
        self.fds: list[int] = []
        self.cgroup: SandboxCgroup | None = None

    @property
    def procs(self) -> list[str]:
        return self.cgroup.procs if self.cgroup is not None else []

    def pipe(self) -> tuple[int, int]:
        read_end, write_end = os.pipe2(os.O_CLOEXEC)
        self.fds += [read_end, write_end]
        return read_end, write_end

    def __enter__(self) -> _Pending:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        if exc_type is None:
            return
        for fd in self.fds:
            os.close(fd)
        if self.cgroup is not None:
            self.cgroup.remove()


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


def _read_failure(status_r: int) -> str | None:
    """The ``F`` record a failed pre-warmed child left, if any."""
    os.set_blocking(status_r, False)
    try:
        data = os.read(status_r, 65536)
    except OSError:
        return None
    for kind, payload in RecordParser().feed(data):
        if kind == FAILED and isinstance(payload, tuple) and len(payload) == 2:
            return failed_step(int(payload[0]), str(payload[1]))[1]
    return None


def _is_a_sandbox_backend(backend: ProcessBackend) -> SandboxBackend:
    """Never called: mypy checks here that the backend offers all of ``SandboxBackend``."""
    return backend
