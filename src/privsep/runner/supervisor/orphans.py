"""Records of running sandboxes, so a restarted supervisor can kill what a crash left behind.

Each sandbox gets a small JSON file in ``state/sandboxes/``: its root pid, that process's
start time (so a reused pid is never mistaken for it), and its process group. At start the
supervisor kills every recorded sandbox that is still alive, then deletes the records.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import time
from pathlib import Path

from privsep.secrets.files import make_private_dir

log = logging.getLogger("privsep.supervisor.orphans")


def process_start_time(pid: int) -> int | None:
    """Field 22 of ``/proc/<pid>/stat`` (clock ticks since boot), or ``None`` if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            data = fh.read()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    fields = data[data.rfind(b")") + 2 :].split()
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                data = fh.read()
            ppid = int(data[data.rfind(b")") + 2 :].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out: list[int] = []
    stack = [root]
    while stack:
        pid = stack.pop()
        for child in children.get(pid, []):
            out.append(child)
            stack.append(child)
    return out


class OrphanRecords:
    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def add(self, sandbox_id: str, *, pid: int | None, item: str) -> None:
        if pid is None:
            return
        make_private_dir(str(self.directory))
        record = {
            "pid": pid,
            "start": process_start_time(pid),
            "item": item,
            "pgid": _pgid(pid),
            "at": time.time(),
        }
        tmp = self.directory / f".{sandbox_id}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(record, fh)
        os.replace(tmp, self.directory / f"{sandbox_id}.json")

    def remove(self, sandbox_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.directory / f"{sandbox_id}.json")

    def reap_orphans(self) -> int:
        """Kill every recorded sandbox still alive (and its descendants); clear the records."""
        if not self.directory.is_dir():
            return 0
        killed = 0
        for path in self.directory.glob("*.json"):
            try:
                record = json.loads(path.read_text())
                pid, start = int(record["pid"]), record.get("start")
            except (OSError, ValueError, KeyError, TypeError):
                path.unlink(missing_ok=True)
                continue
            if start is not None and process_start_time(pid) == start:
                victims = [pid, *_descendants(pid)]
                for victim in victims:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(victim, signal.SIGKILL)
                pgid = record.get("pgid")
                if isinstance(pgid, int) and pgid > 1 and pgid != os.getpgid(0):
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(pgid, signal.SIGKILL)
                killed += len(victims)
                log.warning("killed orphaned sandbox of %s (pid %d)", record.get("item"), pid)
            path.unlink(missing_ok=True)
        return killed


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None
