"""The container backend: one ``SandboxSpec`` in, one locked-down Docker container out.

DESIGN.md's container rules, and how each is made:

* **non-root user**: ``user=<pool uid>:<pool uid>`` from the same :class:`UidPool` the process
  backend uses, one uid per running sandbox, released once its container is removed;
* **all capabilities dropped, no-new-privileges**: ``cap_drop=["ALL"]``,
  ``security_opt=["no-new-privileges"]``; Docker's default seccomp profile stays on; never
  privileged, no devices beyond Docker's minimal ``/dev``;
* **read-only root with a tmpfs /tmp**: ``read_only=True``, ``/tmp`` a ``noexec,nosuid,nodev``
  tmpfs of ``limits.tmp_bytes`` (``/dev/shm`` the same size);
* **pids/memory/cpu limits**: ``pids_limit``, ``mem_limit`` (= ``memswap_limit``: no swap),
  ``nano_cpus``, and rlimits (``nofile``, ``cpu``, ``fsize``, ``core=0``) as ``ulimits``;
* **network none unless the policy allows**: ``network_mode`` ``none`` (loopback only) or
  ``host`` for ``spec.network == "host"``;
* **mounts**: ``code_paths``/``bundle_paths`` read-only at the same path, the work dir
  read-write (0700, owned by the uid), the credential socket file at its path, and nothing
  else of the host (``hidden_paths`` inside those trees are covered by an empty tmpfs or an
  empty root-owned file). No config file, credential file or Docker socket goes in.

How a sandbox starts. The container runs ``python3 -I -m privsep.sandbox._incontainer PLAN
STATUS`` as its PID 1 (``init`` off): the host pid of that process (``State.Pid``) is the
sandbox's root process, the one the supervisor binds its credential socket to, and
``SO_PEERCRED`` reports exactly that pid for a connection made from inside (the kernel
translates pids into the receiver's PID namespace). ``PLAN`` is a JSON file in the work dir
(entry point, argv, payload, environment) and ``STATUS`` a FIFO there whose read end this
backend holds; see ``_incontainer``. The environment is the spec's only.

What the backend watches, all from one reactor thread (``_reactor``), as the process backend
does: the container's output, read from Docker's attach stream (the log driver is ``none``, so
Docker keeps no copy outside ``limits.log_max_bytes``), the status FIFO, a pidfd on PID 1 and
the wall-clock deadline. Signals go to the pidfd (``SIGTERM``, then ``SIGKILL`` after the
grace); ``SIGKILL`` to PID 1 takes the whole container down with it. When PID 1 has exited, a
worker thread asks Docker for the exit code and ``OOMKilled`` and removes the container. Every
container carries the labels ``privsep.sandbox_id`` and ``privsep.supervisor``; ``close()``
removes this backend's, and a new backend removes those a dead one with the same name left.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import stat
import tempfile
from concurrent.futures import ThreadPoolExecutor

from privsep.sandbox._backend_base import BackendBase
from privsep.sandbox._container_handle import ContainerHandle
from privsep.sandbox._docker import JSON, DockerAPI, docker_client, one_line
from privsep.sandbox._hostprep import (
    open_log,
    prepare_socket,
    prepare_workdir,
    release_workdir,
    write_all,
)
from privsep.sandbox._incontainer import PLAN_NAME, STATUS_NAME
from privsep.sandbox._reactor import Reactor
from privsep.sandbox._reactor_handle import Launched
from privsep.sandbox.errors import SandboxLaunchError, SandboxUnavailable
from privsep.sandbox.handle import SandboxBackend
from privsep.sandbox.image import BUILD_COMMAND, SOURCE_LABEL, default_image, source_digest
from privsep.sandbox.spec import SandboxSpec
from privsep.sandbox.uidpool import UidPool

__all__ = [
    "ContainerBackend",
    "ContainerHandle",  # lives in ``_container_handle``; the package exports it from here
    "docker_client",
    "running_containers",
]

log = logging.getLogger("privsep.sandbox")

LABEL_SANDBOX = "privsep.sandbox_id"
LABEL_SUPERVISOR = "privsep.supervisor"
ENTRY_MODULE = "privsep.sandbox._incontainer"


class ContainerBackend(BackendBase[ContainerHandle]):
    """Launches sandboxes as Docker containers. One per supervisor; thread-safe."""

    def __init__(
        self,
        *,
        image: str | None = None,
        uid_pool: UidPool | None = None,
        log_dir: str | None = None,
        supervisor: str = "privsep",
        docker_workers: int = 4,
    ) -> None:
        if os.geteuid() != 0:
            raise SandboxUnavailable(
                "privsep: the container backend runs as root: it hands work dirs and "
                "credential sockets to pool uids"
            )
        self.image = image or default_image()
        self.supervisor = supervisor
        self._client = docker_client()
        self._api: DockerAPI = self._client.api
        try:
            self._check_image()
            self._remove_stale()
        except BaseException:
            self._client.close()
            raise
        self._pool = uid_pool if uid_pool is not None else UidPool(100_000, 1000)
        self._log_dir = log_dir or tempfile.mkdtemp(prefix="privsep-sandbox-logs-")
        self._private = tempfile.mkdtemp(prefix="privsep-container-")
        self._empty_file = os.path.join(self._private, "empty")
        with open(self._empty_file, "wb"):
            pass
        os.chmod(self._empty_file, 0o400)
        super().__init__(Reactor(name="privsep-container-reactor"))
        self._docker = ThreadPoolExecutor(
            max_workers=docker_workers, thread_name_prefix="privsep-docker"
        )

    # -- start-up ---------------------------------------------------------------------------

    def _check_image(self) -> None:
        import docker.errors

        try:
            info = self._api.inspect_image(self.image)
        except docker.errors.ImageNotFound:
            raise SandboxUnavailable(
                f"privsep: the sandbox image {self.image} is missing; build it with "
                f"{BUILD_COMMAND}"
                + ("" if self.image == default_image() else f" --tag {self.image}")
            ) from None
        labels = (info.get("Config") or {}).get("Labels") or {}
        have, want = labels.get(SOURCE_LABEL), source_digest()
        if have != want:
            raise SandboxUnavailable(
                f"privsep: the sandbox image {self.image} was built from other privsep sources "
                f"({SOURCE_LABEL}={have}, these are {want}); rebuild it with {BUILD_COMMAND}"
            )

    def _remove_stale(self) -> None:
        """Containers of an earlier backend with this supervisor's name: it died without
        cleaning up. Nothing of theirs may keep running under a uid we will hand out again."""
        stale = self._api.containers(
            all=True, filters={"label": f"{LABEL_SUPERVISOR}={self.supervisor}"}
        )
        for entry in stale:
            log.warning(
                "privsep: removing container %s left over by an earlier supervisor",
                entry.get("Names", [entry["Id"][:12]])[0],
            )
            with contextlib.suppress(Exception):
                self._api.remove_container(entry["Id"], force=True)

    def unenforced_limits(self) -> tuple[str, ...]:
        """None: Docker applies every sandbox's memory and pids limits to its container."""
        return ()

    def describe(self) -> str:
        """One line for the supervisor's startup log: how children are isolated here."""
        last = self._pool.first + self._pool.count - 1
        return (
            f"container backend: image {self.image}, uid pool {self._pool.first}..{last}, "
            "no capabilities, no-new-privileges, read-only root"
        )

    @property
    def uid_pool(self) -> UidPool:
        """The pool sandboxes draw their uids from."""
        return self._pool

    # -- launching --------------------------------------------------------------------------

    def launch(self, spec: SandboxSpec) -> ContainerHandle:
        """Start one container for ``spec``. Raises :class:`SandboxLaunchError` on failure."""
        self._ensure_open()
        uid = self._pool.acquire()
        fds: list[int] = []
        container_id: str | None = None
        try:
            workdir = prepare_workdir(spec.workdir, uid, uid, chown=True)
            socket_path = prepare_socket(spec.credential_socket, uid, uid, chown=True)
            log_path = spec.log_path or os.path.join(self._log_dir, f"{spec.sandbox_id}.log")
            log_fd = open_log(log_path)
            fds.append(log_fd)
            plan_path = os.path.join(workdir, PLAN_NAME)
            status_path = os.path.join(workdir, STATUS_NAME)
            _write_plan(plan_path, spec, socket_path, uid)
            status_fd = _make_status_fifo(status_path, uid)
            fds.append(status_fd)
            container_id = self._create(spec, uid, workdir, socket_path, plan_path, status_path)
            out_fd = self._attach(container_id)
            fds.append(out_fd)
            self._api.start(container_id)
            pid, pidfd = self._root_process(container_id)
        except Exception as exc:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            if container_id is not None:
                with contextlib.suppress(Exception):
                    self._api.remove_container(container_id, force=True)
            with contextlib.suppress(OSError):
                release_workdir(spec.workdir)
            self._pool.release(uid)
            if isinstance(exc, SandboxUnavailable):
                raise
            raise SandboxLaunchError(
                f"privsep: cannot launch container sandbox {spec.sandbox_id}: {one_line(exc)}"
            ) from exc
        handle = ContainerHandle(
            reactor=self._reactor,
            launched=Launched(spec, uid, pid, pidfd, out_fd, status_fd, log_fd, log_path),
            container_id=container_id,
            api=self._api,
            docker=self._docker,
            finished=self._finished,
        )
        return self._watch(handle)

    def _create(
        self,
        spec: SandboxSpec,
        uid: int,
        workdir: str,
        socket_path: str | None,
        plan_path: str,
        status_path: str,
    ) -> str:
        from docker.types import LogConfig, Mount, Ulimit

        lim = spec.limits
        mounts: list[Mount] = []
        sources: list[str] = []
        for path in (*spec.code_paths, *spec.bundle_paths):
            real = os.path.realpath(path)
            if not os.path.exists(real):
                raise SandboxLaunchError(f"read-only path {path} does not exist")
            mounts.append(Mount(path, real, type="bind", read_only=True))
            sources.append(real)
        mounts.append(Mount(workdir, workdir, type="bind", read_only=False))
        sources.append(workdir)
        if socket_path is not None:
            mounts.append(Mount(socket_path, socket_path, type="bind", read_only=False))
        tmpfs = {
            "/tmp": f"rw,nosuid,nodev,noexec,size={lim.tmp_bytes},mode=1777"  # noqa: S108
        }
        for hidden in spec.hidden_paths:
            real = os.path.realpath(hidden)
            if not any(_within(real, src) for src in sources) or not os.path.lexists(real):
                continue  # not mounted, so already absent
            if os.path.isdir(real):
                tmpfs[real] = "ro,nosuid,nodev,noexec,size=4k,mode=0700"
            else:
                mounts.append(Mount(real, self._empty_file, type="bind", read_only=True))
        ulimits = [Ulimit(name="nofile", soft=lim.nofile, hard=lim.nofile)]
        ulimits.append(Ulimit(name="core", soft=0, hard=0))
        if lim.cpu_seconds is not None:
            ulimits.append(Ulimit(name="cpu", soft=lim.cpu_seconds, hard=lim.cpu_seconds + 1))
        if lim.fsize_bytes is not None:
            ulimits.append(Ulimit(name="fsize", soft=lim.fsize_bytes, hard=lim.fsize_bytes))
        host_network = spec.network == "host"
        host_config = self._api.create_host_config(
            mounts=mounts,
            tmpfs=tmpfs,
            read_only=True,
            cap_drop=["ALL"],
            security_opt=["no-new-privileges"],
            privileged=False,
            init=False,
            network_mode="host" if host_network else "none",
            pids_limit=lim.pids if lim.pids is not None else -1,
            mem_limit=lim.memory_bytes,
            memswap_limit=lim.memory_bytes,
            nano_cpus=int(lim.cpus * 1e9) if lim.cpus is not None else None,
            shm_size=lim.tmp_bytes,
            ulimits=ulimits,
            log_config=LogConfig(type="none"),
            ipc_mode="private",
            auto_remove=False,  # removed by us, after its exit code and OOM flag are read
        )
        created = self._api.create_container(
            self.image,
            command=["python3", "-I", "-m", ENTRY_MODULE, plan_path, status_path],
            user=f"{uid}:{uid}",
            environment={},
            working_dir=workdir,
            hostname=None if host_network else f"privsep-{spec.kind}",
            labels={LABEL_SANDBOX: spec.sandbox_id, LABEL_SUPERVISOR: self.supervisor},
            name=f"privsep-{spec.sandbox_id}",
            host_config=host_config,
            stdin_open=False,
            tty=False,
        )
        return str(created["Id"])

    def _attach(self, container_id: str) -> int:
        """Docker's attach stream (stdout and stderr, multiplexed), as a non-blocking fd.

        Attached before the start, as ``docker run`` does, so nothing is missed and nothing
        is buffered yet in the SDK's HTTP reader. The fd is a dup: ours to close.
        """
        sock = self._api.attach_socket(container_id, params={"stdout": 1, "stderr": 1, "stream": 1})
        try:
            fd = os.dup(sock.fileno())
        finally:
            with contextlib.suppress(Exception):
                sock.close()
        os.set_inheritable(fd, False)
        os.set_blocking(fd, False)
        return fd

    def _root_process(self, container_id: str) -> tuple[int | None, int]:
        """The host pid of the container's PID 1 and a pidfd on it; ``(None, -1)`` if it has
        already exited. The pidfd is checked to hold a process of this container (its cgroup
        names the container), so a pid reused in between is never taken for it."""
        state = self._api.inspect_container(container_id)["State"]
        pid = int(state.get("Pid") or 0)
        if pid <= 0 or not state.get("Running"):
            return None, -1
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            return None, -1
        try:
            with open(f"/proc/{pid}/cgroup") as fh:
                ours = container_id in fh.read()
        except OSError:
            ours = False
        if not ours:
            os.close(pidfd)
            raise SandboxLaunchError(
                f"Docker reports pid {pid} for container {container_id[:12]}, but that process "
                "is not in the container's cgroup"
            )
        return pid, pidfd

    # -- bookkeeping ------------------------------------------------------------------------

    def _finished(self, handle: ContainerHandle, release_uid: bool) -> None:
        if release_uid:
            self._pool.release(handle.uid)
        else:
            log.error(
                "privsep: container %s of sandbox %s could not be removed; uid %d is quarantined",
                handle.container_id[:12],
                handle.sandbox_id,
                handle.uid,
            )
        self._forget(handle)

    def close(self, grace: float = 1.0) -> None:
        """Kill every running sandbox, wait for them, and remove every container of ours."""
        handles = self._mark_closed()
        if handles is None:
            return
        self._end_all(handles, grace, wait=grace + 30.0)
        with contextlib.suppress(Exception):
            self._remove_stale()  # anything a failed removal left
        self._reactor.stop()
        self._docker.shutdown(wait=True)
        self._client.close()
        with contextlib.suppress(OSError):
            os.unlink(self._empty_file)
            os.rmdir(self._private)


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _write_plan(path: str, spec: SandboxSpec, socket_path: str | None, uid: int) -> None:
    plan = {
        "entry": spec.entry_point,
        "argv": list(spec.argv),
        "payload": base64.b64encode(spec.payload).decode("ascii"),
        "env": dict(spec.env),
        "socket": socket_path,
    }
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o400)
    try:
        os.fchown(fd, uid, uid)
        write_all(fd, json.dumps(plan).encode())
    finally:
        os.close(fd)


def _make_status_fifo(path: str, uid: int) -> int:
    """The FIFO the entry code reports on; returns our (non-blocking) read end."""
    os.mkfifo(path, 0o600)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISFIFO(st.st_mode):
            raise SandboxLaunchError(f"{path} is not the FIFO just made")
        os.fchown(fd, uid, uid)
    except BaseException:
        os.close(fd)
        raise
    return fd


def running_containers(supervisor: str) -> list[JSON]:
    """The containers (any state) labelled with ``supervisor``'s name; for tests and tools."""
    client = docker_client()
    try:
        return list(
            client.api.containers(all=True, filters={"label": f"{LABEL_SUPERVISOR}={supervisor}"})
        )
    finally:
        client.close()


def _is_a_sandbox_backend(backend: ContainerBackend) -> SandboxBackend:
    """Never called: mypy checks here that the backend offers all of ``SandboxBackend``."""
    return backend
