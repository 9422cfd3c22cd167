"""Definition files pinned by content, so a run imports the code it was parsed from.

Discovery hashes each changed file and keeps a copy of exactly the bytes it hashed in
``runtime/bundles/<sha256>/<file name>`` (readable by sandboxes, which get the store mounted
read-only). The parse job's URI carries the hash (``file:///w/etl.py#sha256=...``), the
server records it on the workflow version, and every task and trigger of a run started from
that version gets the same copy, even if the file has been edited since. The file keeps its
name, so its module name inside the sandbox is the same as before.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from urllib.parse import unquote, urlparse

_DIGEST = re.compile(r"^sha256=([0-9a-f]{64})$")


def pinned_uri(path: str, digest: str) -> str:
    return f"{Path(path).as_uri()}#sha256={digest}"


def split_uri(uri: str) -> tuple[str, str | None]:
    """The local path of a ``file://`` URI (or a plain path) and its pinned digest, if any."""
    parsed = urlparse(uri)
    path = unquote(parsed.path) if parsed.scheme == "file" else uri.split("#", 1)[0]
    match = _DIGEST.match(parsed.fragment or "")
    return path, (match.group(1) if match else None)


class BundleStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    def keep(self, path: str, digest: str, data: bytes) -> Path:
        """Store ``data`` (whose sha256 is ``digest``) under its digest; idempotent."""
        directory = self.root / digest
        target = directory / os.path.basename(path)
        if target.is_file():
            return target
        self.root.mkdir(mode=0o711, exist_ok=True)
        os.chmod(self.root, 0o711)  # noqa: S103 - sandboxes traverse, never list
        directory.mkdir(mode=0o755, exist_ok=True)
        os.chmod(directory, 0o755)  # noqa: S103 - code, not secrets: sandboxes must read it
        tmp = directory / f".{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
        return target

    def path_for(self, uri: object) -> str:
        """Where a sandbox finds the definition file a URI names: the pinned copy when the URI
        carries a digest and the copy exists, else the file itself."""
        if not isinstance(uri, str) or not uri:
            return ""
        path, digest = split_uri(uri)
        if digest:
            copy = self.root / digest / os.path.basename(path)
            if copy.is_file():
                return str(copy)
        return path

    def prune(self, keep_seconds: float, now: float) -> int:
        """Drop copies not used for ``keep_seconds`` (by their directory's mtime)."""
        removed = 0
        if not self.root.is_dir():
            return 0
        for entry in os.scandir(self.root):
            with contextlib.suppress(OSError):
                if (
                    entry.is_dir(follow_symlinks=False)
                    and now - entry.stat().st_mtime > keep_seconds
                ):
                    for child in os.scandir(entry.path):
                        os.unlink(child.path)
                    os.rmdir(entry.path)
                    removed += 1
        return removed
