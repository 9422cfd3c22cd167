"""Helpers shared by the sandbox backend tests (imported as a plain module)."""

from __future__ import annotations

import textwrap
from pathlib import Path

from privsep.sandbox import Limits, SandboxSpec

RUN_PATH = "privsep.sandbox.entrypoints:run_path"


def script(bundle: Path, name: str, source: str) -> Path:
    """Write a script into the bundle (readable by the sandbox uid)."""
    path = bundle / name
    path.write_text(textwrap.dedent(source))
    path.chmod(0o644)
    return path


def spec_for(
    bundle: Path, path: Path, *args: str, limits: Limits | None = None, **kw: object
) -> SandboxSpec:
    """A task spec running ``path`` with run_path, work dir next to the bundle."""
    workdir = bundle.parent / f"work-{path.stem}"
    return SandboxSpec(
        kind=kw.pop("kind", "task"),  # type: ignore[arg-type]
        entry_point=RUN_PATH,
        argv=(str(path), *args),
        workdir=str(workdir),
        bundle_paths=(str(bundle),),
        limits=limits or Limits(wall_seconds=30),
        **kw,  # type: ignore[arg-type]
    )
