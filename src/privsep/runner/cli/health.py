"""``runner health``: one probe for each long-running component, and ``auto`` for containers.

The supervisor is judged by its heartbeat file (:mod:`privsep.runner.supervisor.health`); the
server by its own ``GET /v1/health`` on the address it binds; the token-refresher by what it
shares, a token file or ticket cache still valid (:mod:`privsep.runner.supervisor.refresher`).
An OCI image has a single ``HEALTHCHECK`` for whatever its containers run, so ``--component
auto`` asks the one process that decides a container's health, PID 1 of its PID namespace,
which runner command it runs.
"""

from __future__ import annotations

from pathlib import Path

from privsep.runner.cli.server import answers_health, local_address
from privsep.runner.config.loader import Config
from privsep.runner.errors import CommandError
from privsep.runner.supervisor.health import HealthResult, check_health

COMPONENTS = ("supervisor", "server", "token-refresher")
"""The components ``--component`` names; ``auto`` picks one of them."""

PID1_CMDLINE = Path("/proc/1/cmdline")


def component_of(cmdline: bytes) -> str | None:
    """The component a NUL-separated command line runs (``runner server``, ``python runner
    --config F supervisor``, the same behind an init such as ``docker-init --``), or None.

    The first word after ``runner`` that names a component decides: options and their values
    come before it, and no option value is a component's name in a container's command."""
    args = [arg.decode(errors="replace") for arg in cmdline.split(b"\0") if arg]
    for index, arg in enumerate(args):
        if Path(arg).name == "runner":
            return next((a for a in args[index + 1 :] if a in COMPONENTS), None)
    return None


def container_component() -> str:
    """What PID 1 runs, for ``--component auto``; a clear error when it runs no component."""
    try:
        cmdline = PID1_CMDLINE.read_bytes()
    except OSError as exc:
        raise CommandError(f"cannot read {PID1_CMDLINE}: {exc.strerror or exc}") from None
    component = component_of(cmdline)
    if component is None:
        shown = cmdline.replace(b"\0", b" ").decode(errors="replace").strip()
        raise CommandError(
            f"--component auto: PID 1 runs no runner component ({shown!r}); "
            f"name one of {', '.join(COMPONENTS)}"
        )
    return component


def server_health(cfg: Config) -> HealthResult:
    """Whether this host's server answers ``/v1/health`` on ``server.bind``."""
    bind = str(cfg.get("server.bind"))
    address = local_address(bind)
    if address is None:
        return HealthResult(False, f"server.bind {bind!r} has no port to probe")
    host, port = address
    if answers_health(host, port):
        return HealthResult(True, f"server answers /v1/health on {host}:{port}")
    return HealthResult(False, f"server does not answer /v1/health on {host}:{port}")


def check(cfg: Config, component: str, max_age: float | None) -> HealthResult:
    """The verdict for ``component`` (one of :data:`COMPONENTS` or ``auto``)."""
    if component == "auto":
        component = container_component()
    if component == "server":
        return server_health(cfg)
    if component == "token-refresher":
        from privsep.runner.supervisor.refresher import refresher_health

        ok, reason = refresher_health(cfg)
        return HealthResult(ok, reason)
    age = max_age or 3 * float(cfg.get("supervisor.heartbeat_interval")) + 10
    return check_health(str(cfg.path_of("core.state_dir")), age)
