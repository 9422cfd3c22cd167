"""Discovery in a real supervisor: manifest-only discovery, a broken manifest, and a workflow
author's symlink to a root-only file.

A real ``runner server`` and ``runner supervisor`` run as processes (see ``stack.py``); the
parse sandboxes are real. The supervisor runs as root, as in production.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from stack import Stack, running_stack

SECRET = "hunter2-do-not-leak"


def _workflow(workflow_id: str) -> str:
    return (
        "from privsep.client import Context, Workflow\n\n"
        f"wf = Workflow({workflow_id!r}, schedule=None)\n\n\n"
        "@wf.task\ndef hello(ctx: Context) -> None:\n    return None\n"
    )


@pytest.fixture
def stack() -> Iterator[Stack]:
    """Discovery from the manifest alone."""
    with running_stack(
        "pd-", uid_first=205_000, PRIVSEP__SUPERVISOR__DISCOVERY_SOURCES="manifest"
    ) as s:
        yield s


def _workflows(stack: Stack) -> dict[str, Any]:
    resp = stack.operator("GET", "/v1/operator/workflows")
    return {w["id"]: w for w in resp.json()["workflows"]}


def _manifest(folder: Path, workflows: dict[str, str]) -> None:
    tmp = folder / ".manifest.tmp"
    tmp.write_text(json.dumps({"workflows": workflows}))
    tmp.rename(folder / "manifest.json")


def test_manifest_discovery_in_a_real_supervisor(stack: Stack) -> None:
    folder = stack.home / "workflows"
    (folder / "listed.py").write_text(_workflow("listed"))
    (folder / "unlisted.py").write_text(_workflow("unlisted"))
    # A workflow author points a definition file at a file only root may read.
    private = stack.home / "private"
    private.mkdir(mode=0o700)
    (private / "secret.txt").write_text(f"password: {SECRET}\n")  # a SyntaxError if imported
    (private / "secret.txt").chmod(0o600)
    (folder / "leak.py").symlink_to(private / "secret.txt")
    _manifest(folder, {"listed": "listed.py", "leak": "leak.py"})
    stack.start("supervisor", "supervisor")

    def leak_handled() -> tuple[list[Any]] | None:
        """The parse errors (in a tuple: an empty list is falsy), once leak.py was either
        refused or parsed (and failed)."""
        errors: list[Any] = stack.operator("GET", "/v1/operator/parse-errors").json()["errors"]
        refused = "leak.py not read: it resolves to" in stack.output("supervisor")
        return (errors,) if refused or any("leak.py" in e["file_path"] for e in errors) else None

    stack.wait_for(lambda: "listed" in _workflows(stack), 60, "listed.py to be parsed")
    [errors] = stack.wait_for(leak_handled, 60, "leak.py to be refused or parsed")
    assert not any(SECRET in e["message"] or "leak.py" in e["file_path"] for e in errors)
    assert "leak.py not read: it resolves to" in stack.output("supervisor")
    assert "unlisted" not in _workflows(stack)  # only the manifest's files: no crawl
    copies = [p for p in (stack.home / "run" / "bundles").rglob("*") if p.is_file()]
    assert copies, "discovery keeps a pinned copy of each file it read"
    assert not any(SECRET in p.read_text(errors="replace") for p in copies)

    # A broken manifest: the scan reports nothing, so no workflow is deactivated.
    (folder / "manifest.json").write_text('{"workflows": {"listed": "listed.py",')
    stack.wait_for(
        lambda: "discovery found nothing this time" in stack.output("supervisor"),
        30,
        "the supervisor to report the broken manifest",
    )
    assert "not valid JSON" in stack.output("supervisor")
    assert _workflows(stack)["listed"]["active"]

    # Mended, and listing one more file: it is parsed, and the first one stays.
    _manifest(folder, {"listed": "listed.py", "unlisted": "unlisted.py"})
    stack.wait_for(lambda: "unlisted" in _workflows(stack), 60, "unlisted.py to be parsed")
    assert "discovery works again" in stack.output("supervisor")
    assert _workflows(stack)["listed"]["active"]
    assert stack.output("supervisor").count("leak.py not read") == 1  # said once, not per scan


@pytest.fixture
def default_stack() -> Iterator[Stack]:
    """The default discovery sources: the manifest and the crawl."""
    with running_stack("pd-", uid_first=206_000) as s:
        yield s


def test_a_file_cannot_take_over_a_workflow_the_manifest_gives_another(
    default_stack: Stack,
) -> None:
    stack = default_stack
    folder = stack.home / "workflows"
    (folder / "payroll.py").write_text(_workflow("payroll"))
    # Another author's file, found by the crawl, declares the payroll team's workflow.
    (folder / "sneaky.py").write_text(_workflow("payroll").replace("return None", "return 1"))
    (folder / "mine.py").write_text(_workflow("mine"))
    _manifest(folder, {"payroll": "payroll.py"})
    stack.start("supervisor", "supervisor")

    def refused() -> list[Any]:
        errors = stack.operator("GET", "/v1/operator/parse-errors").json()["errors"]
        return [e for e in errors if e["file_path"].endswith("/sneaky.py")]

    [error] = stack.wait_for(refused, 60, "sneaky.py's result to be refused")
    assert "declares workflow 'payroll', which manifest.json does not assign" in error["message"]
    stack.wait_for(lambda: "payroll" in _workflows(stack), 60, "payroll.py to be parsed")
    assert _workflows(stack)["payroll"]["source_uri"].endswith("/payroll.py")
    assert any(
        e["file_path"].endswith("/mine.py")
        for e in stack.operator("GET", "/v1/operator/parse-errors").json()["errors"]
    )  # the crawl found it, the manifest does not list it: refused too

    # Listing mine.py in the manifest parses it again, unchanged, and it is stored.
    _manifest(folder, {"payroll": "payroll.py", "mine": "mine.py"})
    stack.wait_for(lambda: "mine" in _workflows(stack), 60, "mine.py to be parsed again")
    assert _workflows(stack)["payroll"]["source_uri"].endswith("/payroll.py")
