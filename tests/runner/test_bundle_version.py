"""The bundle version: the checked-out git commit, read from files, never by running git.

Repositories are made with the real ``git`` binary and every answer is compared with
``git rev-parse HEAD``. The attacks are set up as a workflow author could set them up in a
repository the supervisor (root) looks at. The last test runs a real server and supervisor
and reads the version back from the operator API.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from stack import Stack, short_home

from privsep.runner.sources.bundle_version import BundleVersionSource, NoVersion, git_head_commit

GIT = shutil.which("git")
# Under PRIVSEP_TESTS_STRICT=1 (CI) a missing git fails these tests instead of skipping them.
pytestmark = pytest.mark.skipif(
    GIT is None and os.environ.get("PRIVSEP_TESTS_STRICT") != "1",
    reason="needs the git binary to build repositories",
)
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: chowns files")

SECRET = "5ec2e7" * 6 + "abcd"  # 40 hex digits: it would pass as a commit id if it were read


def git(cwd: Path, *args: str) -> str:
    """Run the real git with no user or system configuration."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(cwd),
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_CONFIG_GLOBAL": "/dev/null",
        "GIT_AUTHOR_NAME": "a",
        "GIT_AUTHOR_EMAIL": "a@example.com",
        "GIT_COMMITTER_NAME": "a",
        "GIT_COMMITTER_EMAIL": "a@example.com",
    }
    done = subprocess.run(
        [str(GIT), "-c", "init.defaultBranch=main", "-c", "safe.directory=*", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, (args, done.stderr)
    return done.stdout.strip()


def commit(repo: Path, name: str, text: str = "x = 1\n") -> str:
    path = repo / "flows" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", f"add {name}")
    return git(repo, "rev-parse", "HEAD")


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A repository with two commits on main, the workflows in its ``flows`` folder."""
    r = tmp_path / "repo"
    r.mkdir()
    git(r, "init", "-q")
    commit(r, "a.py")
    commit(r, "b.py")
    return r


def version(folder: Path) -> str:
    """What the supervisor would send, with its source set to git."""
    return BundleVersionSource(folder).read("git")


# --- real repositories ----------------------------------------------------------------------


def test_a_branch_commit_is_the_version(repo: Path) -> None:
    assert version(repo / "flows") == git(repo, "rev-parse", "HEAD")
    assert version(repo) == git(repo, "rev-parse", "HEAD")


def test_another_branch_and_a_detached_head(repo: Path) -> None:
    git(repo, "checkout", "-q", "-b", "feature/deep/name")
    head = commit(repo, "c.py")
    assert version(repo / "flows") == head
    git(repo, "checkout", "-q", "--detach", "HEAD~2")
    assert (repo / ".git/HEAD").read_text().strip() == git(repo, "rev-parse", "HEAD")
    assert version(repo / "flows") == git(repo, "rev-parse", "HEAD") != head


def test_packed_refs(repo: Path) -> None:
    git(repo, "checkout", "-q", "-b", "release")
    head = commit(repo, "c.py")
    git(repo, "pack-refs", "--all")
    assert not (repo / ".git/refs/heads/release").exists()  # only packed-refs has it now
    assert version(repo / "flows") == head == git(repo, "rev-parse", "HEAD")


def test_a_worktree_reads_its_own_head_through_commondir(repo: Path, tmp_path: Path) -> None:
    wt = tmp_path / "wt"
    git(repo, "worktree", "add", "-q", "-b", "wt-branch", str(wt))
    head = commit(wt, "only-in-worktree.py")
    assert (wt / ".git").is_file()
    assert version(wt / "flows") == head == git(wt, "rev-parse", "HEAD")
    assert version(repo / "flows") == git(repo, "rev-parse", "HEAD") != head
    git(repo, "pack-refs", "--all")  # the worktree's branch now lives in the common packed-refs
    assert version(wt / "flows") == head


def test_a_sha256_repository(tmp_path: Path) -> None:
    r = tmp_path / "repo256"
    r.mkdir()
    git(r, "init", "-q", "--object-format=sha256")
    head = commit(r, "a.py")
    assert len(head) == 64
    assert version(r / "flows") == head


def test_no_repository_and_no_commit_give_no_version(tmp_path: Path) -> None:
    (tmp_path / "plain" / "flows").mkdir(parents=True)
    assert version(tmp_path / "plain" / "flows") == ""
    assert version(tmp_path / "missing") == ""
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    git(fresh, "init", "-q")
    with pytest.raises(NoVersion, match="has no commit yet"):
        git_head_commit(fresh)
    assert version(fresh) == ""


def test_none_and_literal_sources(repo: Path) -> None:
    source = BundleVersionSource(repo / "flows")
    assert source.read("none") == ""
    assert source.read("literal:release-2024.06") == "release-2024.06"
    assert source.read("literal:" + "r" * 250) == "r" * 250  # the server's limit
    with pytest.raises(ValueError):  # the configuration never lets these through
        source.read("literal:" + "r" * 251)


# --- attacks from the repository's authors --------------------------------------------------

_SPAWN_EVENTS = {"subprocess.Popen", "os.exec", "os.posix_spawn", "os.spawn", "os.system"}
_spawned: list[str] | None = None
_hooked = False


def _audit(event: str, args: tuple[object, ...]) -> None:
    if _spawned is not None and (event in _SPAWN_EVENTS or event.startswith("os.fork")):
        _spawned.append(f"{event} {args!r}"[:200])


def _processes_started_by(call: Callable[[], str]) -> tuple[str, list[str]]:
    """``call()``, and every process it started (fork, exec, spawn), seen by an audit hook."""
    global _spawned, _hooked
    if not _hooked:  # an audit hook cannot be removed: it records only inside this function
        sys.addaudithook(_audit)
        _hooked = True
    _spawned = []
    try:
        result = call()
    finally:
        spawned, _spawned = _spawned, None
    return result, spawned


def test_the_repository_cannot_make_root_run_anything(repo: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = f"touch {marker}"
    git(repo, "config", "core.fsmonitor", evil)
    for hook in ("post-checkout", "post-index-change", "reference-transaction", "pre-commit"):
        path = repo / ".git/hooks" / hook
        path.write_text(f"#!/bin/sh\n{evil}\n")
        path.chmod(0o755)
    git(repo, "status")  # the attack is real: git itself runs the author's command...
    assert marker.exists()
    marker.unlink()

    found, spawned = _processes_started_by(lambda: version(repo / "flows"))
    assert found == git(repo, "rev-parse", "HEAD")
    assert not marker.exists()  # ...the supervisor never does
    assert spawned == []  # nor does it start any process at all


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    """A root-only file outside the repository whose content looks like a commit id."""
    path = tmp_path / "root-only" / "token"
    path.parent.mkdir(mode=0o700)
    path.write_text(SECRET + "\n")
    path.chmod(0o600)
    return path


def _refused(folder: Path, caplog: pytest.LogCaptureFixture, why: str) -> None:
    with caplog.at_level(logging.INFO, logger="privsep.supervisor"):
        assert version(folder) == ""
    assert SECRET not in caplog.text
    assert why in caplog.text, caplog.text
    assert "Traceback" not in caplog.text


def test_a_symlinked_head_is_not_followed(
    repo: Path, secret: Path, caplog: pytest.LogCaptureFixture
) -> None:
    head = repo / ".git/HEAD"
    head.unlink()
    head.symlink_to(secret)
    _refused(repo / "flows", caplog, "HEAD is a symlink: not followed")


def test_a_symlinked_ref_or_ref_directory_is_not_followed(
    repo: Path, secret: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ref = repo / ".git/refs/heads/main"
    ref.unlink()
    ref.symlink_to(secret)
    _refused(repo / "flows", caplog, "refs/heads/main is a symlink: not followed")
    caplog.clear()
    ref.unlink()
    heads = repo / ".git/refs/heads"
    heads.rmdir()
    os.symlink(secret.parent, heads)
    (secret.parent / "main").write_text(SECRET + "\n")
    _refused(repo / "flows", caplog, "refs/heads is a symlink: not followed")


def test_a_ref_name_cannot_climb_out(
    repo: Path, secret: Path, caplog: pytest.LogCaptureFixture
) -> None:
    climb = os.path.relpath(secret, repo / ".git")
    (repo / ".git/HEAD").write_text(f"ref: refs/../{climb}\n")
    _refused(repo / "flows", caplog, "names an invalid ref")


def test_a_hard_link_to_another_file_is_not_read(
    repo: Path, secret: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ref = repo / ".git/refs/heads/main"
    ref.unlink()
    os.link(secret, ref)
    _refused(repo / "flows", caplog, "has 2 hard links")


@needs_root
def test_gitdir_and_commondir_may_not_point_at_someone_elses_directory(
    repo: Path, tmp_path: Path, secret: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # root's own repository, with the secret as its commit
    theirs = tmp_path / "root-only" / "private.git"
    (theirs / "refs/heads").mkdir(parents=True)
    (theirs / "HEAD").write_text("ref: refs/heads/main\n")
    (theirs / "refs/heads/main").write_text(SECRET + "\n")
    # the author's work tree (uid 4242) whose .git file points there
    author = tmp_path / "author"
    (author / "flows").mkdir(parents=True)
    dot_git = author / ".git"
    dot_git.write_text(f"gitdir: {theirs}\n")
    os.chown(dot_git, 4242, 4242)
    _refused(author / "flows", caplog, "owned by uid 0, not by uid 4242")

    # the same through a worktree-style commondir inside a git directory the author owns
    caplog.clear()
    own = tmp_path / "author-gitdir"
    own.mkdir()
    (own / "HEAD").write_text("ref: refs/heads/main\n")
    (own / "commondir").write_text(f"{theirs}\n")
    for path in (own, own / "HEAD", own / "commondir"):
        os.chown(path, 4242, 4242)
    dot_git.write_text(f"gitdir: {own}\n")
    _refused(author / "flows", caplog, "owned by uid 0, not by uid 4242")


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (b"\xff\xfe\x00garbage" + os.urandom(100), "is not UTF-8 text"),
        (b"ref: refs/heads/main\n" * 400_000, "HEAD is larger than 4096 bytes"),  # 8 MB
        (b"ref: refs/heads/" + b"m" * 9000 + b"\n", "HEAD is larger than 4096 bytes"),
        (b"deadbeef\n", "holds neither a commit id nor a ref"),
        (b"", "holds neither a commit id nor a ref"),
        (b"0" * 40 + b"\n", "holds neither a commit id nor a ref"),
        (b"ref: refs/heads/.invalid\n", "keeps its refs in a reftable"),
        (b"ref: \n", "names an invalid ref"),
        (b"ref: refs/heads/main\nref: refs/heads/other\n", "holds more than one line"),
    ],
    ids=[
        "garbage",
        "huge",
        "huge-line",
        "short-id",
        "empty",
        "null-id",
        "reftable",
        "empty-ref",
        "two-lines",
    ],
)
def test_malformed_head_gives_no_version(
    repo: Path, content: bytes, why: str, caplog: pytest.LogCaptureFixture
) -> None:
    (repo / ".git/HEAD").write_bytes(content)
    with caplog.at_level(logging.INFO, logger="privsep.supervisor"):
        assert version(repo / "flows") == ""
    assert "Traceback" not in caplog.text
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert why in caplog.text
    assert len(caplog.text) < 1000  # a line for a person, not a dump of the file


def test_a_problem_is_logged_once_not_on_every_scan(
    repo: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (repo / ".git/HEAD").write_bytes(b"\xff\xfe garbage")
    source = BundleVersionSource(repo / "flows")
    with caplog.at_level(logging.INFO, logger="privsep.supervisor"):
        assert [source.read("git") for _ in range(5)] == [""] * 5
    assert len(caplog.records) == 1
    assert "no bundle version for parses" in caplog.text


def test_a_fifo_head_does_not_stall_the_supervisor(repo: Path) -> None:
    head = repo / ".git/HEAD"
    head.unlink()
    os.mkfifo(head)
    found: list[str] = []
    reader = threading.Thread(target=lambda: found.append(version(repo / "flows")), daemon=True)
    reader.start()
    reader.join(5)
    blocked = reader.is_alive()
    if blocked:  # release it: a writer lets its open() return
        fd = os.open(head, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        reader.join(5)
    assert not blocked, "reading a FIFO HEAD blocked"
    assert found == [""]


def test_an_invalid_source_stops_the_supervisor_at_start(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PRIVSEP")}
    env.update(PRIVSEP_HOME=str(tmp_path), PRIVSEP__SUPERVISOR__BUNDLE_VERSION="gitt")
    done = subprocess.run(
        [sys.executable, "-m", "privsep", "supervisor"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1, done.stderr
    assert "supervisor.bundle_version): must be git, none or literal:TEXT" in done.stderr


# --- end to end -----------------------------------------------------------------------------

SIMPLE = textwrap.dedent("""
    from privsep.client import Context, Workflow

    wf = Workflow("versioned", schedule=None)

    @wf.task
    def only(ctx: Context) -> None:
        pass
""")


@pytest.fixture
def stack_in_repo() -> Iterator[tuple[Stack, Path]]:
    # A short home for the unix socket paths, as in test_supervisor_e2e.
    home = short_home("ps-")
    repo = home / "repo"
    s = Stack(
        home,
        uid_first=145_000,  # this test's own sandbox uid range (140000.. is test_supervisor_e2e's)
        PRIVSEP__CORE__WORKFLOWS_DIR=str(repo / "flows"),
    )
    s.setup()
    repo.mkdir()
    git(repo, "init", "-q")
    try:
        yield s, repo
    finally:
        s.stop_all()
        shutil.rmtree(home, ignore_errors=True)


def test_the_supervisor_records_the_commit_with_each_parse(
    stack_in_repo: tuple[Stack, Path],
) -> None:
    stack, repo = stack_in_repo
    head = commit(repo, "versioned.py", SIMPLE)
    stack.start_server()
    stack.start("supervisor", "supervisor")

    def recorded() -> str | None:
        for wf in stack.operator("GET", "/v1/operator/workflows").json()["workflows"]:
            if wf["id"] == "versioned" and wf["bundle_version"]:
                return str(wf["bundle_version"])
        return None

    assert stack.wait_for(recorded, 30, "the workflow to be parsed with a version") == head
