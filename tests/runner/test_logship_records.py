"""The log shipper's per-file records, rewritten in place.

A record is rewritten by one write at offset 0 (no temporary file, no rename: each of those
cost an inode), so a shorter record must still read back exactly, not with the tail of the
longer one it overwrote.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

from privsep.runner.supervisor.logship import LogShipper, _Log


def shipper(tmp_path: Path) -> LogShipper:
    # The API is never called here: only the records are written and read.
    return LogShipper(cast(Any, None), tmp_path)


def test_a_shorter_record_reads_back_exactly_over_a_longer_one(tmp_path: Path) -> None:
    ship = shipper(tmp_path)
    entry = _Log("task", "a1", "/var/log/privsep/task-a1.log", "s" * 32)
    entry.shipped, entry.execution, entry.done = 123_456_789, 12, False
    ship._write_record(entry)
    longer = (tmp_path / "task-a1.json").stat().st_size

    entry.shipped, entry.execution, entry.done = 7, 1, True
    ship._write_record(entry)

    path = tmp_path / "task-a1.json"
    assert path.stat().st_size == longer  # padded, never truncated: one write, no window
    assert json.loads(path.read_text()) == entry.record()
    back = ship._read_record(path)
    assert back is not None
    assert (back.shipped, back.execution, back.done, back.stream) == (7, 1, True, "s" * 32)


def test_a_record_is_rewritten_without_a_new_file(tmp_path: Path) -> None:
    ship = shipper(tmp_path)
    entry = _Log("parse", "p1", "/x.log", "t" * 32)
    ship._write_record(entry)
    inode = (tmp_path / "parse-p1.json").stat().st_ino
    for shipped in range(1, 20):
        entry.shipped = shipped
        ship._write_record(entry)
    assert (tmp_path / "parse-p1.json").stat().st_ino == inode
    assert sorted(p.name for p in tmp_path.iterdir()) == ["parse-p1.json"]
    back = ship._read_record(tmp_path / "parse-p1.json")
    assert back is not None and back.shipped == 19
