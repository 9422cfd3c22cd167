"""Discovery reads a definition file again only when its stat says it may have changed."""

from __future__ import annotations

import os
import time
from pathlib import Path

from privsep.runner.sources.discovery import RACY_SECONDS, Discovery

OLD = time.time() - 3600  # well outside the racy window


def _write(path: Path, text: str, *, mtime: float | None = OLD) -> None:
    path.write_text(text)
    if mtime is not None:
        os.utime(path, (mtime, mtime))


def _taken(discovery: Discovery) -> None:
    """Scan and commit, as the supervisor does once the server has taken the changes."""
    discovery.commit(discovery.scan())


def test_an_unchanged_file_is_not_read_again(tmp_path: Path) -> None:
    folder = tmp_path / "wf"
    folder.mkdir()
    _write(folder / "a.py", "A = 1\n")
    _write(folder / "b.py", "B = 1\n")
    discovery = Discovery(folder, tmp_path / "state.json")
    first = discovery.scan()
    assert (first.read, sorted(p for p, _ in first.changed)) == (
        2,
        [str(folder / "a.py"), str(folder / "b.py")],
    )
    discovery.commit(first)
    again = discovery.scan()
    assert (again.read, again.changed, again.deleted) == (0, [], [])


def test_same_size_rewrite_with_the_old_mtime_is_still_seen(tmp_path: Path) -> None:
    folder = tmp_path / "wf"
    folder.mkdir()
    path = folder / "a.py"
    _write(path, "A = 1\n")
    discovery = Discovery(folder, tmp_path / "state.json")
    _taken(discovery)
    _write(path, "A = 2\n")  # same size, mtime set back: only the ctime tells
    changes = discovery.scan()
    assert changes.read == 1
    [(changed, digest)] = changes.changed
    assert changed == str(path) and changes.contents[digest] == b"A = 2\n"


def test_a_recently_modified_file_is_read_on_every_scan(tmp_path: Path) -> None:
    folder = tmp_path / "wf"
    folder.mkdir()
    _write(folder / "fresh.py", "X = 1\n", mtime=None)  # mtime: now
    _write(folder / "old.py", "Y = 1\n")
    discovery = Discovery(folder, tmp_path / "state.json")
    _taken(discovery)
    assert discovery.scan().read == 1  # the fresh one: a write in the same tick would not show
    os.utime(folder / "fresh.py", (time.time() - RACY_SECONDS - 1,) * 2)
    assert discovery.scan().read == 1  # its stat changed: read once more
    assert discovery.scan().read == 0


def test_a_change_the_server_has_not_taken_is_offered_again_with_its_bytes(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "wf"
    folder.mkdir()
    _write(folder / "a.py", "A = 1\n")
    discovery = Discovery(folder, tmp_path / "state.json")
    first = discovery.scan()  # never committed: the report failed
    second = discovery.scan()
    assert second.changed == first.changed
    [(_, digest)] = second.changed
    assert second.contents[digest] == b"A = 1\n"


def test_deleted_and_replaced_files(tmp_path: Path) -> None:
    folder = tmp_path / "wf"
    folder.mkdir()
    _write(folder / "a.py", "A = 1\n")
    _write(folder / "b.py", "B = 1\n")
    discovery = Discovery(folder, tmp_path / "state.json")
    _taken(discovery)
    (folder / "a.py").unlink()
    replacement = folder / ".b.py.tmp"
    _write(replacement, "B = 3\n")
    os.rename(replacement, folder / "b.py")  # a new inode, everything else alike
    changes = discovery.scan()
    assert changes.deleted == [str(folder / "a.py")]
    assert [p for p, _ in changes.changed] == [str(folder / "b.py")]
