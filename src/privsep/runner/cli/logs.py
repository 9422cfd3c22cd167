"""``runner logs ATTEMPT [--follow]``: show an attempt's captured output, live if it runs.

Logs live in ``state/logs/<kind>-<id>.log``, already escaped by the sandbox backend (no raw
control characters reach the terminal). ``--follow`` keeps printing while a sandbox record
for that attempt exists, like ``tail -f`` that knows when the writer is gone.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from privsep.runner.errors import CommandError


def find_log(logs_dir: Path, item_id: str) -> Path:
    if not item_id or "/" in item_id or item_id.startswith("."):
        raise CommandError(f"{item_id!r} is not an attempt id", 2)
    for kind in ("task", "parse", "trigger"):
        path = logs_dir / f"{kind}-{item_id}.log"
        if path.is_file():
            return path
    raise CommandError(
        f"no log for {item_id} in {logs_dir} (wrong id, or removed by "
        "supervisor.log_retention_days)"
    )


def _running(records_dir: Path, item_id: str) -> bool:
    for record in records_dir.glob("*.json"):
        try:
            item = json.loads(record.read_text()).get("item", "")
        except (OSError, ValueError):
            continue
        if isinstance(item, str) and item.endswith(f":{item_id}"):
            return True
    return False


def show_log(state_dir: Path, item_id: str, *, follow: bool, poll: float = 0.2) -> int:
    path = find_log(state_dir / "logs", item_id)
    out = sys.stdout.buffer
    with open(path, "rb") as fh:
        while True:
            chunk = fh.read(65536)
            if chunk:
                out.write(chunk)
                out.flush()
                continue
            if not follow or not _running(state_dir / "sandboxes", item_id):
                rest = fh.read()
                out.write(rest)
                out.flush()
                return 0
            time.sleep(poll)
