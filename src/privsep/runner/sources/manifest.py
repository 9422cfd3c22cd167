"""``manifest.json``: which definition file declares which workflow.

A manifest sits in the workflows folder and maps each workflow id to the file that declares it::

    {
      "workflows": {
        "etl": "etl.py",
        "reports": {"uri": "reports/daily.py"}
      }
    }

A URI is a path relative to the folder, an absolute path or a ``file://`` URI, and must name a
``.py`` file inside the folder: the supervisor reads what the manifest names as root and copies
it where sandboxes can read it, so a manifest must not be a way to reach other files. DESIGN.md
also allows a connection id per entry, for definition files fetched from elsewhere; nothing here
fetches files yet, so an entry with a ``connection_id`` or a remote URI is refused with that
said, rather than silently skipped.

The manifest also decides which file may declare which workflow: discovery sends each parse job
the ids its file is given (none for a file only the crawl found), and the server refuses a
result that declares another, so one file cannot take over another's workflow.

The manifest is read by discovery (:func:`privsep.runner.sources.discovery.from_manifest`) and by
``runner manifest check`` / ``generate``, which compare it with a crawl of the folder. Those
tools find each file's workflow ids by reading its syntax tree (``Workflow("etl")`` with a
literal id), never by importing it: a definition file is untrusted code, and only a sandbox
runs it.
"""

from __future__ import annotations

import ast
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

MANIFEST_NAME = "manifest.json"
MAX_MANIFEST_BYTES = 1 << 20
_WORKFLOW_ID = re.compile(r"^[A-Za-z0-9_.\-]{1,250}$")  # the API's workflow id
_ENTRY_KEYS = frozenset({"uri", "connection_id"})


class ManifestError(ValueError):
    """The manifest cannot be used; the message names the file, the entry and the fix."""


@dataclass(frozen=True)
class Entry:
    workflow_id: str
    uri: str  # as written in the manifest
    path: str  # absolute and normalized, inside the folder


@dataclass(frozen=True)
class Manifest:
    file: Path
    entries: tuple[Entry, ...]


def load_manifest(folder: Path) -> Manifest | None:
    """The folder's manifest, or None when it has none. Raises :class:`ManifestError`."""
    from privsep.runner.sources.discovery import open_inside

    file = folder / MANIFEST_NAME
    try:
        fd = open_inside(str(file), os.path.realpath(folder))
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ManifestError(f"{file}: cannot be read: {exc.strerror or exc}") from None
    with os.fdopen(fd, "rb") as fh:
        data = fh.read(MAX_MANIFEST_BYTES + 1)
    if len(data) > MAX_MANIFEST_BYTES:
        raise ManifestError(f"{file}: larger than {MAX_MANIFEST_BYTES >> 20} MiB")
    try:
        document = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise ManifestError(f"{file}: not valid JSON ({exc})") from None
    return Manifest(file, tuple(_entries(document, folder, file)))


def _entries(document: object, folder: Path, file: Path) -> list[Entry]:
    if not isinstance(document, dict) or set(document) != {"workflows"}:
        raise ManifestError(
            f'{file}: must be an object with one key, "workflows" '
            '(for example {"workflows": {"etl": "etl.py"}})'
        )
    workflows = document["workflows"]
    if not isinstance(workflows, dict):
        raise ManifestError(f'{file}: "workflows" must map workflow ids to files')
    entries = []
    for workflow_id, value in workflows.items():
        where = f"{file}: workflow {workflow_id!r}"
        if not _WORKFLOW_ID.match(workflow_id):
            raise ManifestError(f"{where}: a workflow id is 1-250 letters, digits, '_', '.' or '-'")
        if isinstance(value, dict):
            unknown = sorted(set(value) - _ENTRY_KEYS)
            if unknown:
                raise ManifestError(
                    f"{where}: unknown key {unknown[0]!r} (an entry has uri and connection_id)"
                )
            if value.get("connection_id") is not None:
                raise ManifestError(
                    f"{where}: fetching definition files through a connection is not supported "
                    "yet; remove connection_id and name a file inside the workflows folder"
                )
            uri = value.get("uri")
        else:
            uri = value
        if not isinstance(uri, str) or not uri:
            raise ManifestError(f'{where}: give the file as a string, or as {{"uri": "..."}}')
        entries.append(Entry(workflow_id, uri, _local_path(uri, folder, where)))
    return entries


def _local_path(uri: str, folder: Path, where: str) -> str:
    """The absolute path a manifest URI names, refused unless it is a ``.py`` file lexically
    inside ``folder`` (discovery checks the file it opens again, after symlinks)."""
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise ManifestError(f"{where}: {uri} names another host; only local files work")
        raw = unquote(parsed.path)
    elif parsed.scheme and len(parsed.scheme) > 1:  # not a Windows drive letter either
        raise ManifestError(
            f"{where}: {uri} is not a local file; fetching {parsed.scheme}:// URIs is not "
            "supported yet"
        )
    else:
        raw = uri
    base = os.path.normpath(os.path.abspath(folder))
    path = os.path.normpath(os.path.join(base, raw))
    if not path.startswith(base + os.sep):
        raise ManifestError(f"{where}: {uri} is outside the workflows folder {base}")
    if not path.endswith(".py"):
        raise ManifestError(f"{where}: {uri} is not a .py file")
    return path


# --- what a file declares, without running it ---------------------------------------------


@dataclass(frozen=True)
class Declared:
    """The workflow ids a file's syntax tree shows. ``unknown`` is set when it also builds a
    workflow whose id is not a literal (or the file does not parse): then ``ids`` may be
    incomplete."""

    ids: tuple[str, ...]
    unknown: bool


def declared_workflows(source: bytes) -> Declared:
    """Every ``Workflow("id", ...)`` / ``Workflow(workflow_id="id")`` call with a literal id,
    found in the syntax tree; the file is parsed, never executed."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return Declared((), True)
    ids: list[str] = []
    unknown = False
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
        if name != "Workflow":
            continue
        arg = node.args[0] if node.args else None
        for keyword in node.keywords:
            if keyword.arg == "workflow_id":
                arg = keyword.value
        if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
            if arg.value not in ids:
                ids.append(arg.value)
        else:
            unknown = True
    return Declared(tuple(ids), unknown)
