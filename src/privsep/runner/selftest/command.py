"""``runner selftest [--backend process|container] [--json]``: the scorecard on this host."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from privsep.runner.errors import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, CommandError

if TYPE_CHECKING:
    from privsep.runner.supervisor.launch import Backend
    from privsep.runner.supervisor.settings import SupervisorSettings


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``selftest`` to the ``runner`` command line."""
    p = sub.add_parser(
        "selftest",
        help="attack real sandboxes on this host; one line per attack; exit 1 on any leak",
    )
    p.add_argument(
        "--backend",
        choices=("process", "container"),
        help="the sandbox backend to attack (default: sandbox.backend from the configuration)",
    )
    p.add_argument("--json", action="store_true", help="machine-readable scorecard")
    p.set_defaults(handler=_cmd_selftest)


def _cmd_selftest(args: argparse.Namespace) -> int:
    from privsep.runner.config.loader import load_config

    cfg = load_config(args.config)
    return run_selftest(cfg, backend=args.backend, as_json=args.json)


def run_selftest(cfg: Any, *, backend: str | None = None, as_json: bool = False) -> int:
    """Plant secrets, run every attack in a fresh sandbox, print the scorecard."""
    from privsep.runner.selftest.battery import ATTACKS, Verdict, planted, run_battery
    from privsep.runner.supervisor.settings import SupervisorSettings

    if os.geteuid() != 0:
        raise CommandError(
            "selftest must run as root, as the supervisor does: it starts real sandboxes "
            "(sudo runner selftest)",
            EXIT_USAGE,
        )
    settings = SupervisorSettings.from_config(cfg)
    if backend:
        settings = dataclasses.replace(settings, backend=backend)

    def show(verdict: Verdict) -> None:
        if not as_json:
            print(f"{verdict.result:<7} {verdict.attack:<18} {verdict.detail}", flush=True)

    if not as_json:
        print(
            f"privsep selftest: {len(ATTACKS)} attacks, each in a fresh {settings.backend} sandbox",
            flush=True,
        )
    # The backend (and its zygote) starts after the secrets are planted, as a supervisor's
    # would start after it loaded its key: all it could inherit is there by then.
    with planted(cfg, settings) as plant, _backend(settings, plant.area) as sandboxes:
        verdicts = run_battery(sandboxes, settings, plant, progress=show)
    failed = [v for v in verdicts if not v.held]
    if as_json:
        json.dump(
            {
                "backend": settings.backend,
                "ok": not failed,
                "attacks": [dataclasses.asdict(v) for v in verdicts],
            },
            sys.stdout,
            indent=2,
        )
        sys.stdout.write("\n")
    else:
        leaked = sum(v.result == "LEAKED" for v in verdicts)
        errors = sum(v.result == "ERROR" for v in verdicts)
        print(
            f"{len(verdicts) - len(failed)} held, {leaked} leaked, {errors} could not run",
            flush=True,
        )
    return EXIT_FAILURE if failed else EXIT_OK


def _backend(settings: SupervisorSettings, scratch: Path) -> Backend:
    """The backend ``runner supervisor`` would build from these settings, under a name and a
    state directory of its own: a container backend removes leftovers labelled with its
    supervisor's name when it starts, and must not take a running supervisor's for them."""
    from privsep.runner.supervisor.launch import make_backend
    from privsep.secrets.files import make_private_dir

    own = dataclasses.replace(
        settings, name=f"selftest-{os.getpid()}", state_dir=scratch / "state", prewarm=1
    )
    make_private_dir(str(own.logs_dir))
    return make_backend(own)
