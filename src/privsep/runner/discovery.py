"""Find workflow definition files and notice which changed, so only those are parsed.

Runs where the files are (a supervisor with discovery on), never in the server. A content hash
per file is kept in the state directory; a scan yields new or changed files and deleted ones,
and the state is committed only after the server has taken the changes, so a failed report is
retried on the next scan.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Changes:
    changed: list[tuple[str, str]] = field(default_factory=list)  # (path, sha256)
    contents: dict[str, bytes] = field(default_factory=dict)  # sha256 -> the bytes hashed
    deleted: list[str] = field(default_factory=list)
    seen: dict[str, str] = field(default_factory=dict)


class Discovery:
    def __init__(self, folder: Path, state_file: Path) -> None:
        self.folder = folder
        self.state_file = state_file
        try:
            self.known: dict[str, str] = json.loads(state_file.read_text())
        except (OSError, ValueError):
            self.known = {}

    def scan(self) -> Changes:
        changes = Changes()
        if self.folder.is_dir():
            for root, dirs, files in os.walk(self.folder):
                dirs[:] = sorted(d for d in dirs if not d.startswith((".", "__")))
                for name in sorted(files):
                    if not name.endswith(".py") or name.startswith((".", "_")):
                        continue
                    path = os.path.join(root, name)
                    try:
                        with open(path, "rb") as fh:
                            data = fh.read()
                        digest = hashlib.sha256(data).hexdigest()
                    except OSError:
                        continue
                    changes.seen[path] = digest
                    if self.known.get(path) != digest:
                        changes.changed.append((path, digest))
                        changes.contents[digest] = data
        changes.deleted = sorted(set(self.known) - set(changes.seen))
        return changes

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
