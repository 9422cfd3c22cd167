"""Records of running sandboxes, so a restarted supervisor can kill what a crash left behind.

Each running sandbox holds a small JSON record in ``state/sandboxes/``: its root pid, that
process's start time (so a reused pid is never mistaken for it), and its process group. At
start the supervisor kills every recorded sandbox that is still alive, then deletes the
records.

The records are *slots* (``slot-N.json``), rewritten in place
(:func:`~privsep.runner.supervisor.inplace.rewrite_in_place`): a launch writes its record
into a free slot and the sandbox's end writes ``{}`` there, so after the first few sandboxes
the bookkeeping creates and deletes no file at all. There are never more slots than
sandboxes that ran at once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import threading
import time
from pathlib import Path

from privsep.runner.supervisor.inplace import rewrite_in_place
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
    """The ``state/sandboxes`` records: :meth:`add` at launch, :meth:`remove` at the end,
    :meth:`reap_orphans` once at start. Safe to call from any thread."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._lock = threading.Lock()
        self._free: list[Path] = []
        self._held: dict[str, Path] = {}
        self._slots = 0

    def add(self, sandbox_id: str, *, pid: int | None, item: str) -> None:
        if pid is None:
            return
        record = {
            "pid": pid,
            "start": process_start_time(pid),
            "item": item,
            "sandbox": sandbox_id,
            "pgid": _pgid(pid),
            "at": time.time(),
        }
        with self._lock:
            if self._free:
                slot = self._free.pop()
            else:
                slot = self.directory / f"slot-{self._slots}.json"
                self._slots += 1
            self._held[sandbox_id] = slot
        data = json.dumps(record).encode()
        try:
            rewrite_in_place(slot, data)
        except FileNotFoundError:  # the first record, or the directory was removed since
            make_private_dir(str(self.directory))
            rewrite_in_place(slot, data)

    def remove(self, sandbox_id: str) -> None:
        with self._lock:
            slot = self._held.pop(sandbox_id, None)
        if slot is None:
            return
        try:
            rewrite_in_place(slot, b"{}")
        except OSError as exc:  # the slot is not reused: a stale record must not linger
            log.warning("cannot clear the sandbox record %s: %s", slot, exc)
            with contextlib.suppress(OSError):
                os.unlink(slot)
            return
        with self._lock:
            self._free.append(slot)

    def reap_orphans(self) -> int:
        """Kill every recorded sandbox still alive (and its descendants); clear the records.
        Called before the first :meth:`add`."""
        if not self.directory.is_dir():
            return 0
        killed = 0
        for path in self.directory.glob("*.json"):
            try:
                record = json.loads(path.read_text())
                pid, start = int(record["pid"]), record.get("start")
            except (OSError, ValueError, KeyError, TypeError):  # an empty slot, or garbage
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
