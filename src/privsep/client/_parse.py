"""The parse component: import one definition file and submit what it declares.

Runs inside a parse sandbox (no network, read-only code, short timeout). Payload:
``{"path": "/bundle/etl.py"}`` (a ``file://`` URI is accepted too).

Every :class:`~privsep.client.Workflow` the file creates is serialized to the API's plain
``WorkflowDefinition`` JSON (module and qualname of each callable; no pickles, no code
objects) and submitted with ``POST /v1/parse/result``. If importing the file raises anything,
``SyntaxError`` and ``SystemExit`` included, or the definitions are invalid (a cycle, a
duplicate workflow id), the traceback is submitted as the file's parse error instead: that is
data about the file, and the entry point still exits 0.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote, urlsplit

from privsep.client import _components as kit
from privsep.client._client import Client
from privsep.client._exceptions import BadRequest, PrivsepError
from privsep.client._loader import serialize_module

__all__ = ["main", "run", "serialize_module"]


def _path_of(payload: Mapping[str, Any]) -> str | None:
    path = payload.get("path")
    if not isinstance(path, str) or not path:
        return None
    if path.startswith("file://"):
        return unquote(urlsplit(path).path)
    return path


def _parse(client: Client, path: str) -> int:
    """Parse ``payload["path"]`` and submit the result; see the module docstring."""
    workflows: list[dict[str, Any]] = []
    error: str | None = None
    try:
        with kit.stopped_by_sigterm():
            workflows = serialize_module(path)
    except kit.Terminated as exc:
        # Stopped from outside, in the kill grace period: say so, and where it was.
        error = (
            f"importing {path} was stopped by the sandbox (SIGTERM), most likely at the "
            f"parse timeout (supervisor.parse_timeout); it was still running here:\n"
            f"{kit.format_user_error(exc)}"
        )
    except (Exception, SystemExit) as exc:  # user code: its failure is the parse result
        error = kit.format_user_error(exc)
    try:
        try:
            client.submit_parse_result(workflows, error=error)
        except BadRequest as exc:
            # Definitions the server refuses are this file's error, not a crash.
            client.submit_parse_result(
                [], error=f"the server refused the definitions in {path}: {exc.message}"
            )
    except PrivsepError as exc:
        kit.fatal("parse", f"cannot submit the parse result of {path}: {exc}")
        return kit.ExitCode.API_FAILED
    return kit.ExitCode.OK


run = kit.entry("parse", _path_of, 'the payload needs "path": the definition file to parse', _parse)
main = kit.bytes_entry(run, "parse")
