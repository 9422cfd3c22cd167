"""Building the ``runner`` command line: every command group and action is added the same way,
so ``runner GROUP`` without an ACTION is a usage error everywhere and ``--json`` reads alike."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

Handler = Callable[[argparse.Namespace], int]


def group(sub: Any, name: str, help_text: str) -> Any:
    """Add ``runner NAME ACTION`` (ACTION required, parsed into ``NAME_command``); return the
    subparsers to add its actions to."""
    parser = sub.add_parser(name, help=help_text)
    actions = parser.add_subparsers(dest=f"{name}_command", metavar="ACTION")
    actions.required = True
    return actions


def action(
    sub: Any, name: str, help_text: str, handler: Handler, *, json: bool = False
) -> argparse.ArgumentParser:
    """Add one command that runs ``handler``; with ``json``, it takes ``--json``."""
    parser: argparse.ArgumentParser = sub.add_parser(name, help=help_text)
    if json:
        parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.set_defaults(handler=handler)
    return parser


def _seconds(text: str) -> float:
    """A duration given on the command line: a finite number of seconds, zero or more."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0.0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be zero or more seconds")
    return value


def seconds_option(parser: argparse.ArgumentParser, flag: str, help_text: str) -> None:
    """Add ``flag SECONDS`` (default 0, which each command reads as "its own default"), so every
    duration option rejects a negative or non-numeric value the same way."""
    parser.add_argument(flag, type=_seconds, default=0.0, metavar="SECONDS", help=help_text)
