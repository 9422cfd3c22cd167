"""``runner manifest check`` and ``runner manifest generate``.

``check`` compares ``manifest.json`` with a crawl of the workflows folder: definition files the
manifest misses (discovery with only the ``manifest`` source would never parse them), entries
whose file is gone, and entries whose file does not declare the workflow they are listed
under. ``generate`` writes a manifest from a crawl. Both find workflow ids in each file's
syntax tree (see :func:`privsep.runner.sources.manifest.declared_workflows`): nothing is imported.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from privsep.runner.cli.parsers import group
from privsep.runner.errors import EXIT_FAILURE, EXIT_OK, CommandError
from privsep.runner.sources.discovery import MAX_FILE_BYTES, crawl, open_inside
from privsep.runner.sources.manifest import (
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    Declared,
    ManifestError,
    declared_workflows,
    load_manifest,
)

PROGRESS_EVERY = 1000


@dataclass(frozen=True)
class Scanned:
    """One crawled file: what it declares, or why it could not be read."""

    path: str
    declared: Declared | None
    unreadable: str = ""


def _folder(args: argparse.Namespace) -> Path:
    if args.workflows:
        folder = Path(args.workflows).expanduser()
    else:
        from privsep.runner.config.loader import load_config

        folder = load_config(args.config).path_of("core.workflows_dir")
    if not folder.is_dir():
        raise CommandError(
            f"the workflows folder {folder} does not exist: pass --workflows DIR "
            "or set core.workflows_dir"
        )
    return Path(os.path.normpath(os.path.abspath(folder)))  # as manifest entries name files


def _scan(folder: Path, paths: list[str]) -> dict[str, Scanned]:
    """Read each file (inside the folder only, as discovery does) and find its workflow ids."""
    root = os.path.realpath(folder)
    out: dict[str, Scanned] = {}
    for done, path in enumerate(paths, 1):
        if done % PROGRESS_EVERY == 0:
            print(f"read {done}/{len(paths)} files", file=sys.stderr)
        try:
            with os.fdopen(open_inside(path, root), "rb") as fh:
                source = fh.read(MAX_FILE_BYTES + 1)
            if len(source) > MAX_FILE_BYTES:  # as discovery: such a file is never parsed
                raise OSError(0, f"it is larger than {MAX_FILE_BYTES >> 20} MiB")
        except OSError as exc:
            out[path] = Scanned(path, None, exc.strerror or str(exc))
            continue
        out[path] = Scanned(path, declared_workflows(source))
    return out


def _ids(declared: Declared) -> str:
    listed = ", ".join(declared.ids) if declared.ids else "no workflow with a literal id"
    return listed + (" and others built at run time" if declared.unknown and declared.ids else "")


def cmd_manifest_check(args: argparse.Namespace) -> int:
    folder = _folder(args)
    try:
        manifest = load_manifest(folder)
    except ManifestError as exc:
        raise CommandError(str(exc)) from None
    if manifest is None:
        raise CommandError(
            f"{folder} has no {MANIFEST_NAME}: `runner manifest generate --write` "
            "creates one from the files there"
        )
    listed = {entry.path for entry in manifest.entries}
    crawled = crawl(folder)
    scanned = _scan(folder, sorted(set(crawled) | listed))
    problems: list[str] = []
    notes: list[str] = []
    for entry in manifest.entries:
        found = scanned[entry.path]
        if found.declared is None:
            why = "does not exist" if not os.path.lexists(entry.path) else found.unreadable
            problems.append(f"{entry.workflow_id}: {entry.uri} {why}")
        elif entry.workflow_id not in found.declared.ids:
            line = f"{entry.workflow_id}: {entry.uri} declares {_ids(found.declared)}"
            (notes if found.declared.unknown else problems).append(line)
    for path in crawled:
        if path not in listed:
            found = scanned[path]
            what = _ids(found.declared) if found.declared else found.unreadable
            problems.append(f"missing from the manifest: {os.path.relpath(path, folder)} ({what})")
    for line in problems:
        print(f"{manifest.file}: {line}")
    for line in notes:
        print(f"{manifest.file}: cannot tell without running it: {line}")
    summary = f"{len(manifest.entries)} workflows listed, {len(crawled)} definition files found"
    if problems:
        print(f"{len(problems)} problems; {summary}", file=sys.stderr)
        return EXIT_FAILURE
    print(f"{manifest.file} lists every definition file ({summary})")
    return EXIT_OK


def cmd_manifest_generate(args: argparse.Namespace) -> int:
    folder = _folder(args)
    target = folder / MANIFEST_NAME
    if args.write and os.path.lexists(target) and not args.force:
        raise CommandError(f"{target} exists: pass --force to replace it")
    owners: dict[str, list[str]] = {}
    skipped: list[str] = []
    for path, found in _scan(folder, crawl(folder)).items():
        rel = Path(os.path.relpath(path, folder)).as_posix()
        if found.declared is None:
            skipped.append(f"{rel}: {found.unreadable}")
            continue
        if not found.declared.ids:
            skipped.append(f"{rel}: no Workflow with a literal id; add it by hand")
        for workflow_id in found.declared.ids:
            owners.setdefault(workflow_id, []).append(rel)
    clashes = {wid: files for wid, files in owners.items() if len(files) > 1}
    if clashes:
        wid, files = sorted(clashes.items())[0]
        raise CommandError(
            f"workflow {wid!r} is declared in {' and '.join(files)}"
            + (f" (and {len(clashes) - 1} more clashes)" if len(clashes) > 1 else "")
            + ": a workflow id must come from one file; nothing written"
        )
    for line in skipped:
        print(f"not listed: {line}", file=sys.stderr)
    document = {"workflows": {wid: files[0] for wid, files in sorted(owners.items())}}
    text = json.dumps(document, indent=2) + "\n"
    if len(text) > MAX_MANIFEST_BYTES:
        raise CommandError(f"the manifest would be larger than {MAX_MANIFEST_BYTES >> 20} MiB")
    if not args.write:
        sys.stdout.write(text)
        return EXIT_OK
    tmp = folder / f".{MANIFEST_NAME}.{os.getpid()}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise CommandError(f"cannot write {target}: {exc.strerror or exc}") from None
    print(f"wrote {target}: {len(owners)} workflows")
    return EXIT_OK


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``runner manifest check|generate``."""
    actions = group(sub, "manifest", "the workflows folder's manifest.json")
    p = actions.add_parser(
        "check", help="files the manifest misses or misnames; exit 1 if there are any"
    )
    p.set_defaults(handler=cmd_manifest_check)
    _workflows_option(p)
    p = actions.add_parser("generate", help="a manifest from the files in the folder")
    _workflows_option(p)
    p.add_argument("--write", action="store_true", help=f"write DIR/{MANIFEST_NAME}, not stdout")
    p.add_argument("--force", action="store_true", help="with --write: replace an existing one")
    p.set_defaults(handler=cmd_manifest_generate)


def _workflows_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--workflows", metavar="DIR", help="the folder (default: core.workflows_dir)"
    )
