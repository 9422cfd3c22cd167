"""Starting ``runner ui`` against a :class:`~stack.Stack`, as an operator would, and reading
the URL it prints."""

from __future__ import annotations

import json

from stack import Stack


def start_ui(stack: Stack, name: str = "ui", *args: str) -> str:
    """Start ``runner ui --json`` under ``name``; the URL with its one-time token."""
    stack.start(name, "ui", "--json", *args)

    def printed() -> str | None:
        try:
            return str(json.loads(stack.output(name))["url"])
        except ValueError:  # not all of it yet
            return None

    return str(stack.wait_for(printed, 30, "runner ui to print its URL"))
