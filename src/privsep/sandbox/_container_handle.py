"""The handle on one container sandbox: Docker's framed output, and Docker's word on the end.

It is apart from the launcher (``container``) because it changes for other reasons: the launcher
changes with how a container is configured and started, this with how a running one is watched
and read once it ends. Everything else of the watching is the shared ``_reactor_handle``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import struct
from collections.abc import Callable
from concurrent.futures import Executor

from privsep.sandbox._classify import ExitFacts
from privsep.sandbox._docker import DOCKER_TIMEOUT, DockerAPI, one_line
from privsep.sandbox._reactor import Reactor
from privsep.sandbox._reactor_handle import DRAIN_AFTER_EXIT, Launched, ReactorHandle

log = logging.getLogger("privsep.sandbox")

_FRAME = struct.Struct(">BxxxI")  # Docker's multiplexed attach stream: stream, size


class ContainerHandle(ReactorHandle):
    """Handle on one container sandbox. Its state is owned by the backend's reactor thread.

    ``docker`` runs the blocking Docker calls made once PID 1 has exited (wait, inspect,
    remove), so the reactor thread never waits on the engine.
    """

    uid: int

    def __init__(
        self,
        *,
        launched: Launched,
        reactor: Reactor,
        container_id: str,
        api: DockerAPI,
        docker: Executor,
        finished: Callable[[ContainerHandle, bool], None],
    ) -> None:
        super().__init__(launched=launched, reactor=reactor, finished=finished)
        self.container_id = container_id
        self._api = api
        self._docker = docker
        self._frames = bytearray()
        # self._exited (from the base): PID 1 is gone (pidfd)
        self._collected: tuple[int | None, bool, str] | None = None  # exit code, OOM, error
        self._removed = False  # the container is gone, so nothing runs as its uid any more
        self._collecting = False

    def __repr__(self) -> str:
        return (
            f"<ContainerHandle {self.sandbox_id} container={self.container_id[:12]} "
            f"pid={self._pid} status={self._status}>"
        )

    # -- reactor thread ----------------------------------------------------------------------

    def _feed_output(self, data: bytes) -> None:
        self._frames += data
        buf = self._frames
        while len(buf) >= _FRAME.size:
            _, size = _FRAME.unpack_from(buf)
            if len(buf) < _FRAME.size + size:
                break
            self._capture.feed(bytes(buf[_FRAME.size : _FRAME.size + size]))
            del buf[: _FRAME.size + size]

    def _flush_output(self) -> None:
        if self._frames:  # a frame cut short: keep what there is
            self._capture.feed(bytes(self._frames[_FRAME.size :]))
            self._frames.clear()

    def _on_exit(self, fd: int) -> None:
        if fd >= 0:
            self._reactor.remove_reader(fd)
            os.close(fd)
        self._pidfd = -1
        self._exited = True
        self._cancel_timers()
        self._collect()

    def _collect(self) -> None:
        if self._collecting:
            return
        self._collecting = True
        try:
            self._docker.submit(self._collect_in_worker)
        except RuntimeError:  # the executor is shut down: closing
            self._collected = (None, False, "the backend closed before the exit was read")
            self._after_collect()

    def _collect_in_worker(self) -> None:
        """Worker thread: Docker's view of the end, then the container is removed."""
        import docker.errors

        code: int | None = None
        oom = False
        error = ""
        try:
            result = self._api.wait(self.container_id, timeout=DOCKER_TIMEOUT)
            code = int(result.get("StatusCode", -1))
            state = self._api.inspect_container(self.container_id)["State"]
            oom = bool(state.get("OOMKilled"))
            if state.get("Error"):
                error = str(state["Error"])
        except Exception as exc:
            error = one_line(exc)
        try:
            self._api.remove_container(self.container_id, force=True)
            self._removed = True
        except docker.errors.NotFound:
            self._removed = True
        except Exception as exc:
            log.error(
                "privsep: cannot remove container %s of sandbox %s: %s",
                self.container_id[:12],
                self.sandbox_id,
                one_line(exc),
            )
        self._collected = (code, oom, error)
        with contextlib.suppress(RuntimeError):
            self._reactor.call_soon(self._after_collect)

    def _after_collect(self) -> None:
        self._running.set()
        # The container is gone: nothing can write to the FIFO any more.
        if self._status_open:
            self._on_status(self._status_fd)
            self._close_status()
        self._timers.append(self._reactor.call_later(DRAIN_AFTER_EXIT, self._close_output))
        self._maybe_finish()

    def _hard_kill(self) -> None:
        if not self._exited:
            self._signal(signal.SIGKILL)  # through the pidfd: SIGKILL to PID 1 ends it all

    def _end_known(self) -> bool:
        return self._collected is not None

    def _give_back(self) -> bool:
        return self._removed  # a container that could not be removed may still run as the uid

    def _facts(self) -> ExitFacts:
        assert self._collected is not None  # noqa: S101 - _end_known() said so
        code, oom, error = self._collected
        sig: int | None = None
        if code is not None and 128 < code <= 128 + 64:
            # Docker reports a signal death as 128 + n; a voluntary exit(128 + n) looks the
            # same and is read as the signal.
            sig, code = code - 128, None
        return ExitFacts(
            started=self._ready,
            termination=self._termination,
            oom_killed=oom,
            setup_failure=self._failure,
            exit_code=code,
            signal=sig,
            evidence=error or "status unknown",
            lost="Docker did not report the exit",
        )
