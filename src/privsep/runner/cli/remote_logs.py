"""Reading the central logs from any host with an operator credential: the one page fetch,
the follow loop built on it, and ``runner logs``.

``runner logs ATTEMPT`` asks the server when this host has an operator credential
(``operator.credential``): the server holds every execution's output, from whichever node ran
it. It reads the node-local file instead (``state/logs``, what this host's supervisor wrote)
with ``--local``, when there is no operator credential here, or when the server cannot be
asked and the file is here (said on stderr). ``--follow`` polls every
:data:`FOLLOW_POLL` seconds and stops once the server says the log is complete; ``--json``
prints each chunk as one JSON line.

:func:`fetch_log_chunks` and :func:`follow_log` are what other readers (the status page)
use too, with their own :class:`~privsep.runner.cli.operator_client.OperatorClient`.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from privsep.runner.cli.logs import find_log, show_log
from privsep.runner.cli.operator_client import OperatorClient, seg
from privsep.runner.cli.output import clean
from privsep.runner.config.loader import Config
from privsep.runner.errors import CommandError

FOLLOW_POLL = 0.3
PAGE = 500
# How long a plain ``runner logs`` of an ended item waits for its supervisor's last chunk.
SETTLE = 10.0


def fetch_log_chunks(
    client: OperatorClient, attempt_id: str, after: int = 0, limit: int = PAGE
) -> dict[str, Any]:
    """One page of an attempt's (parse job's, trigger batch's) central log:
    ``{"attempt_id", "chunks": [{"seq", "text"}], "next", "complete", ...}``. Poll again
    with ``after=next``. A :class:`CommandError` (one line) when the server refuses, cannot
    be reached, or knows no such item."""
    body = client.call(
        "GET",
        f"/v1/operator/attempts/{seg(attempt_id)}/log",
        params={"after": after, "limit": limit},
        what=f"show the log of {attempt_id}",
    )
    if not isinstance(body, dict) or not isinstance(body.get("chunks"), list):
        raise CommandError(f"cannot show the log of {attempt_id}: the server's answer is not a log")
    return body


def follow_log(
    client: OperatorClient,
    attempt_id: str,
    *,
    follow: bool = True,
    poll: float = FOLLOW_POLL,
    after: int = 0,
    sleep: Callable[[float], None] = time.sleep,
) -> Iterator[dict[str, Any]]:
    """Every chunk of the log, in order, from ``after`` on; with ``follow``, new ones as
    they arrive, until the log is complete. Without it, what the server has now."""
    settle_by: float | None = None
    while True:
        page = fetch_log_chunks(client, attempt_id, after)
        yield from page["chunks"]
        after = int(page["next"])
        if page.get("complete"):
            return
        if len(page["chunks"]) >= PAGE:
            continue  # more is there already
        if not follow:
            if not page.get("ended"):
                return  # running: what there is now
            # Ended, and its supervisor's last chunk is on its way (it ships within a
            # second): wait for it rather than show a log without its end.
            settle_by = settle_by or time.monotonic() + SETTLE
            if time.monotonic() > settle_by:
                return
        sleep(poll)


def show_logs(cfg: Config, attempt_id: str, *, follow: bool, as_json: bool, local: bool) -> int:
    """``runner logs``: from the server or from this node (see the module docstring)."""
    state_dir = cfg.path_of("core.state_dir")
    credential = cfg.path_of("operator.credential")
    if local or not credential.exists():
        return _local(state_dir, attempt_id, follow=follow, as_json=as_json)
    with OperatorClient.from_config(cfg) as client:
        chunks = follow_log(client, attempt_id, follow=follow)
        try:
            first = next(chunks, None)
        except CommandError as exc:
            if not _local_exists(state_dir, attempt_id):
                raise
            print(f"runner: {exc}; showing this node's copy instead", file=sys.stderr)
            return _local(state_dir, attempt_id, follow=follow, as_json=as_json)
        if first is not None:
            _print(first, as_json)
            for chunk in chunks:
                _print(chunk, as_json)
    return 0


def _print(chunk: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps({"seq": chunk["seq"], "text": chunk["text"]}), flush=True)
        return
    # Escaped by the sandbox's capture already; escaped again here, because what reaches
    # a terminal must not depend on every writer upstream having done it.
    sys.stdout.write(clean(str(chunk["text"]), keep_newlines=True, keep_tabs=True))
    sys.stdout.flush()


def _local_exists(state_dir: Path, attempt_id: str) -> bool:
    try:
        find_log(state_dir / "logs", attempt_id)
    except CommandError:
        return False
    return True


def _local(state_dir: Path, attempt_id: str, *, follow: bool, as_json: bool) -> int:
    if not as_json:
        return show_log(state_dir, attempt_id, follow=follow)
    path = find_log(state_dir / "logs", attempt_id)
    for seq, line in enumerate(path.read_text(errors="backslashreplace").splitlines(True), 1):
        print(json.dumps({"seq": seq, "text": line}), flush=True)
    return 0


__all__ = ["FOLLOW_POLL", "fetch_log_chunks", "follow_log", "show_logs"]
