"""The documentation in the repository stays true: the configuration reference is the schema,
and every relative link in README.md and docs/ leads somewhere."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

from helpers import clean_env, run_runner
from privsep.runner.config.rendering import render_reference_markdown
from privsep.runner.config.schema import OPTIONS

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]

# [text](target) and [text]: target, skipping images' and code spans' look-alikes is not
# needed: our pages keep links out of code blocks, which are stripped first.
_INLINE = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
_REFERENCE = re.compile(r"^\s*\[[^\]]+\]:\s*(\S+)", re.M)
_FENCE = re.compile(r"^```.*?^```", re.M | re.S)


def test_configuration_reference_is_current() -> None:
    committed = (DOCS / "configuration.md").read_text()
    assert committed == render_reference_markdown(), (
        "docs/configuration.md is stale: run `runner config reference > docs/configuration.md`"
    )
    for opt in OPTIONS:
        assert f"`{opt.key}`" in committed


def test_config_reference_command_prints_it(tmp_path: Path) -> None:
    result = run_runner("config", "reference", env=clean_env(tmp_path))
    assert result.returncode == 0, result.stderr
    assert result.stdout == render_reference_markdown()


def _links(page: Path) -> list[str]:
    text = _FENCE.sub("", page.read_text())
    return _INLINE.findall(text) + _REFERENCE.findall(text)


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    out = set()
    for line in _FENCE.sub("", page.read_text()).splitlines():
        if m := re.match(r"^#+\s+(.*)$", line):
            slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            out.add(slug)
    return out


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page: Path) -> None:
    broken = []
    for link in _links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", link):  # http:, https:, mailto:, file:
            continue
        path, _, anchor = link.partition("#")
        target = (page.parent / unquote(path)).resolve() if path else page
        if not target.exists():
            broken.append(f"{link} (no {target})")
        elif anchor and target.suffix == ".md" and anchor not in _anchors(target):
            broken.append(f"{link} (no heading #{anchor} in {target.name})")
    assert not broken, f"{page.name}: broken links: {broken}"


def test_the_docs_the_units_name_exist() -> None:
    for name in ("design.md", "deployment.md", "configuration.md", "runbook.md"):
        assert (DOCS / name).is_file(), name
    assert (ROOT / "LICENSE").is_file()
