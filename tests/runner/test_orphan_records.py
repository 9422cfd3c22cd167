"""The supervisor's sandbox records are slots rewritten in place, and still find orphans.

The end-to-end proof that a restarted supervisor kills what a SIGKILLed one left behind is
``test_supervisor_e2e.test_kill_9_then_restart_leaves_no_orphan_and_no_stuck_attempt``; these
check the slots themselves with real processes.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from privsep.runner.supervisor.orphans import OrphanRecords


def sleeper() -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])


def test_a_finished_sandboxs_slot_is_reused_and_no_file_is_made_or_deleted(
    tmp_path: Path,
) -> None:
    records = OrphanRecords(tmp_path / "sandboxes")
    proc = sleeper()
    try:
        records.add("a", pid=proc.pid, item="task:1")
        records.add("b", pid=proc.pid, item="task:2")
        inodes = {p.name: p.stat().st_ino for p in (tmp_path / "sandboxes").iterdir()}
        assert sorted(inodes) == ["slot-0.json", "slot-1.json"]
        for n in range(50):
            records.remove("a")
            records.add("a", pid=proc.pid, item=f"task:{n}")
        after = {p.name: p.stat().st_ino for p in (tmp_path / "sandboxes").iterdir()}
        assert after == inodes
    finally:
        proc.kill()
        proc.wait()


def test_a_restarted_supervisor_kills_recorded_sandboxes_and_only_those(tmp_path: Path) -> None:
    first = OrphanRecords(tmp_path / "sandboxes")
    alive, ended = sleeper(), sleeper()
    try:
        first.add("alive", pid=alive.pid, item="task:alive")
        first.add("ended", pid=ended.pid, item="task:ended")
        first.remove("ended")  # its slot now holds "{}" padded over the old record
        # The crash: nothing else runs. The next process reads the slots.
        killed = OrphanRecords(tmp_path / "sandboxes").reap_orphans()
        assert killed == 1
        assert alive.wait(timeout=10) == -9
        assert ended.poll() is None  # an emptied slot names no one
        assert list((tmp_path / "sandboxes").iterdir()) == []
    finally:
        for proc in (alive, ended):
            proc.kill()
            proc.wait()
