"""The handle on one process-backend sandbox: how its end is learnt, and what it gives back.

It is apart from the launcher (``process``) because it changes for other reasons: the launcher
changes with how a child is started (spawn, zygote, pre-warmed), this with how a started one
ends. Everything else of the watching is the shared ``_reactor_handle``.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable

from privsep.sandbox._classify import ExitFacts
from privsep.sandbox._reactor import Reactor
from privsep.sandbox._reactor_handle import DRAIN_AFTER_EXIT, Launched, ReactorHandle
from privsep.sandbox._steps import SETUP_CODES
from privsep.sandbox._wire import EXITED
from privsep.sandbox.cgroups import SandboxCgroup
from privsep.sandbox.status import signal_name

log = logging.getLogger("privsep.sandbox")


class ProcessHandle(ReactorHandle):
    """Handle on one process-backend sandbox. Its state is owned by the reactor thread.

    ``is_child``: the sandbox's outermost process is our child (spawn mode), so we reap it and
    know how it ended; otherwise the zygote reaps it and only the status records tell.
    """

    def __init__(
        self,
        *,
        launched: Launched,
        reactor: Reactor,
        is_child: bool,
        cgroup: SandboxCgroup | None,
        finished: Callable[[ProcessHandle, bool], None],
    ) -> None:
        super().__init__(launched=launched, reactor=reactor, finished=finished)
        self._is_child = is_child
        self._cgroup = cgroup
        self._exit_record: tuple[int | None, float, float, int] | None = None
        self._monitor: tuple[str, int] | None = None  # ("exit", code) | ("signal", n); spawn

    def __repr__(self) -> str:
        return f"<ProcessHandle {self.sandbox_id} pid={self._pid} status={self._status}>"

    # -- reactor thread ----------------------------------------------------------------------

    def _on_record(self, kind: bytes, payload: object) -> None:
        if kind == EXITED and isinstance(payload, tuple) and len(payload) == 4:
            self._exit_record = payload
        else:
            super()._on_record(kind, payload)

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
        self._cancel_timers()
        self._timers.append(self._reactor.call_later(DRAIN_AFTER_EXIT, self._force_finish))
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

    def _end_known(self) -> bool:
        return self._exited

    def _give_back(self) -> bool:
        if self._cgroup is None or self._cgroup.remove(attempts=20, delay=0.005):
            return True
        # Something of this sandbox outlived it: its uid must not go to the next one.
        log.error(
            "privsep: sandbox %s left processes in its cgroups %s; uid %s is quarantined",
            self.sandbox_id,
            self._cgroup.dirs,
            self.uid,
        )
        return False

    def _facts(self) -> ExitFacts:
        code: int | None = None
        sig: int | None = None
        cpu: float | None = None
        maxrss: int | None = None
        if self._exit_record is not None:
            raw, utime, stime, maxrss = self._exit_record
            cpu = utime + stime
            if raw is not None and os.WIFSIGNALED(raw):
                sig = os.WTERMSIG(raw)
            elif raw is not None:
                code = os.waitstatus_to_exitcode(raw)
        return ExitFacts(
            started=self._ready,
            termination=self._termination,
            oom_killed=self._cgroup is not None and self._cgroup.oom_killed(),
            setup_failure=self._setup_failure(),
            exit_code=code,
            signal=sig,
            cpu_seconds=cpu,
            max_rss_kib=maxrss,
            evidence=self._describe_monitor(),
            lost="the process reaping the sandbox (monitor or zygote) died without reporting",
        )

    def _setup_failure(self) -> tuple[int, str | None] | None:
        """The child's F record; else the setup step its monitor's exit code names."""
        if self._failure is not None:
            return self._failure
        monitor = self._monitor
        if monitor is not None and monitor[0] == "exit" and monitor[1] in SETUP_CODES:
            return monitor[1], None
        return None

    def _describe_monitor(self) -> str:
        if self._monitor is None:
            return "status unknown"
        kind, value = self._monitor
        if kind == "signal":
            return f"monitor killed by {signal_name(value)}"
        return f"monitor exited with code {value}"
