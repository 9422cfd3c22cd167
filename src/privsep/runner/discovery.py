"""Find workflow definition files and notice which changed, so only those are parsed.

Runs where the files are (a supervisor with discovery on), never in the server. A content hash
per file is kept in the state directory; a scan yields new or changed files and deleted ones,
and the state is committed only after the server has taken the changes, so a failed report is
retried on the next scan.

A file is read and hashed again only when its ``stat`` changed (size, mtime, ctime, inode),
as git trusts its index: scans run every few seconds over folders of thousands of files.
Like git's "racily clean" rule, a file whose mtime is within :data:`RACY_SECONDS` of the scan
is always read, since a write in the same timestamp tick as the last read would not show.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

RACY_SECONDS = 2.0
"""A file modified this recently is hashed on every scan, whatever its ``stat`` says."""

_StatKey = tuple[int, int, int, int, int]


def _stat_key(st: os.stat_result) -> _StatKey:
    """What says a file may have changed: another file (dev, inode), size, content or
    metadata times."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


@dataclass
class Changes:
    changed: list[tuple[str, str]] = field(default_factory=list)  # (path, sha256)
    contents: dict[str, bytes] = field(default_factory=dict)  # sha256 -> the bytes hashed
    deleted: list[str] = field(default_factory=list)
    seen: dict[str, str] = field(default_factory=dict)
    read: int = 0  # files read and hashed by this scan (the others matched their last stat)


class Discovery:
    def __init__(self, folder: Path, state_file: Path) -> None:
        self.folder = folder
        self.state_file = state_file
        try:
            self.known: dict[str, str] = json.loads(state_file.read_text())
        except (OSError, ValueError):
            self.known = {}
        # path -> (stat when last hashed, digest); in memory only, so a restart reads all once.
        self._hashed: dict[str, tuple[_StatKey, str]] = {}

    def scan(self) -> Changes:
        changes = Changes()
        racy_after = time.time_ns() - int(RACY_SECONDS * 1e9)
        hashed: dict[str, tuple[_StatKey, str]] = {}
        if self.folder.is_dir():
            for root, dirs, files in os.walk(self.folder):
                dirs[:] = sorted(d for d in dirs if not d.startswith((".", "__")))
                for name in sorted(files):
                    if not name.endswith(".py") or name.startswith((".", "_")):
                        continue
                    path = os.path.join(root, name)
                    found = self._digest(path, racy_after, changes)
                    if found is None:
                        continue
                    hashed[path] = found
                    digest = found[1]
                    changes.seen[path] = digest
                    if self.known.get(path) != digest:
                        changes.changed.append((path, digest))
        self._hashed = hashed
        changes.deleted = sorted(set(self.known) - set(changes.seen))
        return changes

    def _digest(self, path: str, racy_after: int, changes: Changes) -> tuple[_StatKey, str] | None:
        """The file's stat and content hash: the last one when its stat has not changed and
        it is not racy, else read now (the bytes then go into ``changes.contents``, since
        only what was hashed may be kept as the pinned copy). None if it cannot be read."""
        try:
            st = os.stat(path)
        except OSError:
            return None
        last = self._hashed.get(path)
        # A change no server has taken yet (a failed report) is read again: its bytes are
        # needed for the pinned copy.
        if (
            last is not None
            and last[0] == _stat_key(st)
            and st.st_mtime_ns < racy_after
            and self.known.get(path) == last[1]
        ):
            return last
        try:
            with open(path, "rb") as fh:
                # Stat before reading: a write during the read changes the stat after this
                # one, so the next scan reads the file again.
                st = os.fstat(fh.fileno())
                data = fh.read()
        except OSError:
            return None
        changes.read += 1
        digest = hashlib.sha256(data).hexdigest()
        changes.contents[digest] = data
        return _stat_key(st), digest

    def commit(self, changes: Changes) -> None:
        """Remember what the server has taken. A scan that found nothing new writes nothing:
        scans run every few seconds, and rewriting an unchanged state file each time was a
        visible share of an idle supervisor's work."""
        if changes.seen == self.known:
            return
        self.known = dict(changes.seen)
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.known, sort_keys=True))
        os.chmod(tmp, 0o600)
        os.replace(tmp, self.state_file)
