"""``runner token-refresher``: the credential sidecar's command (see
:mod:`privsep.runner.supervisor.refresher` for what it does)."""

from __future__ import annotations

import argparse
from typing import Any

from privsep.runner.cli.parsers import action


def cmd_token_refresher(args: argparse.Namespace) -> int:
    from privsep.runner.config.loader import load_config
    from privsep.runner.supervisor.refresher import run_token_refresher

    return run_token_refresher(load_config(args.config))


def register(sub: Any) -> None:
    action(
        sub,
        "token-refresher",
        "hold the supervisor's key (or a keytab) and keep a short-lived token in a shared file",
        cmd_token_refresher,
    )
