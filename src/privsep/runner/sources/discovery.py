"""Find workflow definition files and notice which changed, so only those are parsed.

Runs where the files are (a supervisor with discovery on), never in the server. A content hash
per file is kept in the state directory; a scan yields new or changed files and deleted ones,
and the state is committed only after the server has taken the changes, so a failed report is
retried on the next scan.

Which files there are comes from *discovery sources*: callables that take the workflows folder
and return paths of definition files. Two are built in, and the default list has both:
:func:`from_manifest` (the files ``manifest.json`` names, see
:mod:`privsep.runner.sources.manifest`)
and :func:`crawl` (every ``*.py`` below the folder). A source that raises fails the whole
scan, so that a broken manifest never reads as "every workflow was deleted". With the
``manifest`` source in use and a manifest present, a scan also says which workflow ids each
file may declare (:attr:`Changes.owners`), and a file whose assignment changed counts as changed.

The supervisor reads these files as root and copies them where sandboxes can read them, while
the folder is written by less trusted workflow authors. So a file is only read when the file
actually opened lies inside the folder (a symlink to ``/etc/shadow`` is refused, checked on
the open file, not on its name), is a regular file (a FIFO would hang the loop) and is at
most :data:`MAX_FILE_BYTES` long.

A file is read and hashed again only when its ``stat`` changed (size, mtime, ctime, inode),
as git trusts its index: scans run every few seconds over folders of thousands of files.
Like git's "racily clean" rule, a file whose mtime is within :data:`RACY_SECONDS` of the scan
is always read, since a write in the same timestamp tick as the last read would not show.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import stat
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("privsep.discovery")

Source = Callable[[Path], Iterable["str | os.PathLike[str]"]]
"""A discovery source: the workflows folder in, paths of definition files out."""

BUILTIN_SOURCES = ("manifest", "crawl")
MAX_FILE_BYTES = 4 << 20
"""A definition file larger than this is not read (it would be held in memory and copied)."""

RACY_SECONDS = 2.0
"""A file modified this recently is hashed on every scan, whatever its ``stat`` says."""

_StatKey = tuple[int, int, int, int, int]


def _stat_key(st: os.stat_result) -> _StatKey:
    """What says a file may have changed: another file (dev, inode), size, content or
    metadata times."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def crawl(folder: Path) -> list[str]:
    """Every ``*.py`` below ``folder``, in a stable order; names starting with ``.`` or ``_``
    and directories starting with ``.`` or ``__`` are skipped. Symlinked directories are not
    followed."""
    found: list[str] = []
    if not folder.is_dir():
        return found
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith((".", "__")))
        found.extend(
            os.path.join(root, name)
            for name in sorted(files)
            if name.endswith(".py") and not name.startswith((".", "_"))
        )
    return found


def from_manifest(folder: Path) -> list[str]:
    """The files ``folder/manifest.json`` names; none when there is no manifest. Raises
    :class:`~privsep.runner.sources.manifest.ManifestError` when the manifest is malformed."""
    from privsep.runner.sources.manifest import load_manifest

    manifest = load_manifest(folder)
    return [] if manifest is None else sorted({entry.path for entry in manifest.entries})


def load_sources(spec: str) -> list[tuple[str, Source]]:
    """The sources a ``supervisor.discovery_sources`` value names: comma-separated, each
    ``manifest``, ``crawl`` or ``module:function``. Raises ``ValueError`` saying what is wrong."""
    names = [part.strip() for part in spec.split(",") if part.strip()]
    if not names:
        raise ValueError("names no discovery source: use manifest, crawl or module:function")
    sources: list[tuple[str, Source]] = []
    for name in names:
        if name == "manifest":
            sources.append((name, from_manifest))
        elif name == "crawl":
            sources.append((name, crawl))
        elif ":" in name:
            module, _, attr = name.partition(":")
            try:
                target = getattr(importlib.import_module(module), attr)
            except (ImportError, AttributeError) as exc:
                raise ValueError(f"cannot import the discovery source {name!r}: {exc}") from None
            if not callable(target):
                raise ValueError(f"the discovery source {name!r} is not callable")
            sources.append((name, target))
        else:
            raise ValueError(
                f"unknown discovery source {name!r}: use manifest, crawl or module:function"
            )
    return sources


def open_inside(path: str, root: str) -> int:
    """An fd on ``path``, opened for reading, when what was opened is a regular file inside
    the directory ``root`` (a real path); raises ``OSError`` with a reason otherwise.

    The check is made on the open file (its ``/proc/self/fd`` link), not on the name, so a
    symlink swapped in between a check and the open still cannot point the root supervisor
    at a file outside. ``O_NONBLOCK``: opening a FIFO must not block the loop.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        real = os.readlink(f"/proc/self/fd/{fd}")
        if not real.startswith(root.rstrip("/") + "/"):
            raise OSError(0, f"it resolves to {real}, outside {root}")
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(0, "it is not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return fd


@dataclass
class Changes:
    changed: list[tuple[str, str]] = field(default_factory=list)  # (path, sha256)
    contents: dict[str, bytes] = field(default_factory=dict)  # sha256 -> the bytes hashed
    deleted: list[str] = field(default_factory=list)
    seen: dict[str, str] = field(default_factory=dict)
    read: int = 0  # files read and hashed by this scan (the others matched their last stat)
    # With a manifest in use: path -> the workflow ids it assigns to that file (none for a
    # file only the crawl found). None: no manifest, any file may declare any workflow.
    owners: dict[str, tuple[str, ...]] | None = None

    def workflow_ids(self, path: str) -> tuple[str, ...] | None:
        """The workflow ids the file at ``path`` may declare; None: any."""
        return None if self.owners is None else self.owners.get(path, ())


class DiscoveryError(Exception):
    """A source failed, so this scan reports nothing (no change, no deletion)."""


class Discovery:
    def __init__(
        self, folder: Path, state_file: Path, sources: list[tuple[str, Source]] | None = None
    ) -> None:
        self.folder = folder
        self.state_file = state_file
        self.sources = sources if sources is not None else load_sources(",".join(BUILTIN_SOURCES))
        try:
            self.known: dict[str, str] = json.loads(state_file.read_text())
        except (OSError, ValueError):
            self.known = {}
        # path -> (stat when last hashed, digest); in memory only, so a restart reads all once.
        self._hashed: dict[str, tuple[_StatKey, str]] = {}
        self._refused: dict[str, str] = {}  # path -> why, logged once until it changes

    def paths(self) -> tuple[list[str], dict[str, tuple[str, ...]] | None]:
        """Every definition file the sources name, each once, in the sources' order, and
        what the manifest assigns to each (see :attr:`Changes.owners`). Raises
        :class:`DiscoveryError` when a source fails."""
        from privsep.runner.sources.manifest import load_manifest

        seen: dict[str, None] = {}
        owners: dict[str, tuple[str, ...]] | None = None
        base = os.path.normpath(os.path.abspath(self.folder))  # one name per file
        for name, source in self.sources:
            try:
                if source is from_manifest:  # the built-in: its assignments matter too
                    manifest = load_manifest(Path(base))
                    if manifest is not None:
                        owners = {}
                        for entry in manifest.entries:  # their paths are normalized already
                            owners[entry.path] = (*owners.get(entry.path, ()), entry.workflow_id)
                        seen.update(dict.fromkeys(owners))
                elif source is crawl:  # joined onto the normalized folder: normalized already
                    seen.update(dict.fromkeys(crawl(Path(base))))
                else:
                    found = source(Path(base))
                    seen.update((os.path.normpath(os.path.join(base, p)), None) for p in found)
            except Exception as exc:  # a source is code of the deployment's: report, go on
                raise DiscoveryError(f"discovery source {name}: {exc}") from exc
        return list(seen), owners

    def scan(self) -> Changes:
        paths, owners = self.paths()
        changes = Changes(owners=owners)
        racy_after = time.time_ns() - int(RACY_SECONDS * 1e9)
        hashed: dict[str, tuple[_StatKey, str]] = {}
        refused: dict[str, str] = {}
        root = os.path.realpath(self.folder)  # per scan: the folder may be a moved symlink
        for path in paths:
            # What the server must have taken: the contents, and what the manifest lets the
            # file declare (a manifest edit alone parses the file again under the new rule).
            ids = changes.workflow_ids(path)
            assigned = "" if ids is None else " " + ",".join(ids)
            found = self._digest(path, root, racy_after, changes, refused, assigned)
            if found is None:
                continue
            hashed[path] = found
            digest = found[1]
            changes.seen[path] = digest + assigned
            if self.known.get(path) != changes.seen[path]:
                changes.changed.append((path, digest))
        self._hashed = hashed
        self._refused = refused
        changes.deleted = sorted(set(self.known) - set(changes.seen))
        return changes

    def _digest(
        self,
        path: str,
        root: str,
        racy_after: int,
        changes: Changes,
        refused: dict[str, str],
        assigned: str,
    ) -> tuple[_StatKey, str] | None:
        """The file's stat and content hash: the last one when its stat has not changed and
        it is not racy and the server has taken it with this ``assigned`` suffix (the manifest's
        ids for it), else read now (the bytes then go into ``changes.contents``, since only
        what was hashed may be kept as the pinned copy). None if it cannot or must not be
        read."""
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
            and self.known.get(path) == last[1] + assigned
        ):
            return last
        try:
            fd = open_inside(path, root)
            with os.fdopen(fd, "rb") as fh:
                # Stat before reading: a write during the read changes the stat after this
                # one, so the next scan reads the file again.
                st = os.fstat(fh.fileno())
                if st.st_size > MAX_FILE_BYTES:
                    raise OSError(0, f"it is larger than {MAX_FILE_BYTES >> 20} MiB")
                data = fh.read(MAX_FILE_BYTES + 1)
                if len(data) > MAX_FILE_BYTES:
                    raise OSError(0, f"it is larger than {MAX_FILE_BYTES >> 20} MiB")
        except FileNotFoundError:
            return None
        except OSError as exc:
            why = exc.strerror or str(exc)
            refused[path] = why
            if self._refused.get(path) != why:
                log.warning("definition file %s not read: %s", path, why)
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
