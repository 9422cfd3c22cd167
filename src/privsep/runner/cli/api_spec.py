"""``runner api spec``: the API's OpenAPI document, built offline from the server's app
factory (no server, no database, no configuration). The same document an operator session
fetches from a running server at ``GET /v1/operator/openapi.json``."""

from __future__ import annotations

import argparse
import json
import sys

from privsep.runner.cli.parsers import action, group


def print_spec(args: argparse.Namespace) -> int:
    """Print the document as JSON (it is JSON either way; ``--json`` prints it on one line,
    for a pipe, and without it it is indented, for a person)."""
    from privsep.server.public import openapi_document

    document = openapi_document()
    indent = None if args.json else 2
    sys.stdout.write(json.dumps(document, indent=indent, sort_keys=False) + "\n")
    return 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    g = group(sub, "api", "the internal API")
    action(g, "spec", "print the API's OpenAPI document (JSON), offline", print_spec, json=True)
