"""manifest.json: what it may name, what discovery makes of it, and the check/generate tools."""

from __future__ import annotations

import json
import os
import sys
import textwrap
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest

from privsep.runner.cli.main import main
from privsep.runner.sources.discovery import (
    Discovery,
    DiscoveryError,
    crawl,
    from_manifest,
    load_sources,
)
from privsep.runner.sources.manifest import ManifestError, declared_workflows, load_manifest

ETL = 'from privsep.client import Workflow\nwf = Workflow("etl")\n'
TWO = textwrap.dedent("""
    import privsep.client as c
    a = c.Workflow(workflow_id="alpha", schedule=None)
    b = c.Workflow("beta")
""")
T = TypeVar("T")
DYNAMIC = 'from privsep.client import Workflow\nfor n in ("x", "y"):\n    Workflow(n)\n'


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    wf = tmp_path / "wf"
    (wf / "sub").mkdir(parents=True)
    (wf / "etl.py").write_text(ETL)
    (wf / "sub" / "two.py").write_text(TWO)
    return wf


def _manifest(folder: Path, workflows: object) -> None:
    (folder / "manifest.json").write_text(json.dumps({"workflows": workflows}))


# --- reading a manifest ----------------------------------------------------------------------


def test_entries_as_paths_objects_and_file_uris(folder: Path) -> None:
    _manifest(
        folder,
        {
            "etl": "etl.py",
            "alpha": {"uri": "sub/two.py"},
            "beta": {"uri": (folder / "sub" / "two.py").as_uri(), "connection_id": None},
        },
    )
    manifest = load_manifest(folder)
    assert manifest is not None
    assert [(e.workflow_id, e.path) for e in manifest.entries] == [
        ("etl", str(folder / "etl.py")),
        ("alpha", str(folder / "sub" / "two.py")),
        ("beta", str(folder / "sub" / "two.py")),
    ]
    assert from_manifest(folder) == [str(folder / "etl.py"), str(folder / "sub" / "two.py")]


def test_no_manifest_is_not_an_error(folder: Path) -> None:
    assert load_manifest(folder) is None
    assert from_manifest(folder) == []


@pytest.mark.parametrize(
    ("document", "says"),
    [
        ("{not json", "not valid JSON"),
        ('["etl.py"]', 'one key, "workflows"'),
        ('{"workflows": {}, "extra": 1}', 'one key, "workflows"'),
        ('{"workflows": ["etl.py"]}', "must map workflow ids to files"),
        ('{"workflows": {"no spaces": "etl.py"}}', "a workflow id is"),
        ('{"workflows": {"etl": {"path": "etl.py"}}}', "unknown key 'path'"),
        ('{"workflows": {"etl": 3}}', "give the file as a string"),
        ('{"workflows": {"etl": {"uri": "etl.py", "connection_id": "git"}}}', "connection"),
        ('{"workflows": {"etl": "s3://bucket/etl.py"}}', "s3:// URIs is not supported"),
        ('{"workflows": {"etl": "file://elsewhere/etl.py"}}', "names another host"),
        ('{"workflows": {"etl": "../outside.py"}}', "outside the workflows folder"),
        ('{"workflows": {"etl": "/etc/passwd.py"}}', "outside the workflows folder"),
        ('{"workflows": {"etl": "etl.txt"}}', "is not a .py file"),
    ],
)
def test_a_malformed_manifest_is_refused_with_the_reason(
    folder: Path, document: str, says: str
) -> None:
    (folder / "manifest.json").write_text(document)
    with pytest.raises(ManifestError, match=r"manifest\.json") as caught:
        load_manifest(folder)
    assert says in str(caught.value)


def test_a_manifest_that_is_a_symlink_out_of_the_folder_is_not_read(
    folder: Path, tmp_path: Path
) -> None:
    secret = tmp_path / "secret.json"
    secret.write_text('{"workflows": {"etl": "etl.py"}}')
    (folder / "manifest.json").symlink_to(secret)
    with pytest.raises(ManifestError, match="outside"):
        load_manifest(folder)


def _within(seconds: float, fifo: Path, call: Callable[[], T]) -> T:
    """``call()``, failing (not hanging) the test if it blocks on ``fifo``: a blocked open is
    released by opening the FIFO's other end."""
    done: list[T] = []
    failed: list[BaseException] = []

    def run() -> None:
        try:
            done.append(call())
        except BaseException as exc:
            failed.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # let the blocked open return
        thread.join(5)
        pytest.fail(f"blocked on the FIFO {fifo}")
    if failed:
        raise failed[0]
    return done[0]


def test_a_manifest_that_is_a_fifo_does_not_hang(folder: Path) -> None:
    fifo = folder / "manifest.json"
    os.mkfifo(fifo)
    with pytest.raises(ManifestError, match="not a regular file"):
        _within(5, fifo, lambda: load_manifest(folder))


# --- what a file declares, from its syntax tree ------------------------------------------------


def test_declared_workflows_reads_literal_ids_without_running_the_file(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    source = f"open({str(marker)!r}, 'w').close()\n" + TWO
    found = declared_workflows(source.encode())
    assert (found.ids, found.unknown) == (("alpha", "beta"), False)
    assert not marker.exists()
    assert declared_workflows(DYNAMIC.encode()).unknown
    assert declared_workflows(b"def broken(:\n").unknown
    assert declared_workflows(b"x = 1\n").ids == ()


# --- discovery with sources ------------------------------------------------------------------


def test_manifest_only_discovery_parses_only_what_is_listed(folder: Path, tmp_path: Path) -> None:
    _manifest(folder, {"etl": "etl.py"})
    discovery = Discovery(folder, tmp_path / "state.json", load_sources("manifest"))
    assert [path for path, _ in discovery.scan().changed] == [str(folder / "etl.py")]


def test_both_sources_name_each_file_once(folder: Path, tmp_path: Path) -> None:
    _manifest(folder, {"etl": "etl.py"})
    # A folder named with a trailing slash and a ".." must not make two names for one file.
    odd = Path(str(folder / "sub" / "..") + "/")
    discovery = Discovery(odd, tmp_path / "state.json")  # the default: manifest, crawl
    assert sorted(path for path, _ in discovery.scan().changed) == [
        str(folder / "etl.py"),
        str(folder / "sub" / "two.py"),
    ]


def test_a_broken_manifest_fails_the_scan_and_deletes_nothing(folder: Path, tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    discovery = Discovery(folder, state)
    discovery.commit(discovery.scan())
    known = json.loads(state.read_text())
    assert len(known) == 2
    (folder / "manifest.json").write_text('{"workflows": {"etl": "../x.py"}}')
    with pytest.raises(DiscoveryError, match=r"discovery source manifest: .*outside"):
        discovery.scan()
    assert json.loads(state.read_text()) == known


def test_the_manifest_says_which_workflows_each_file_may_declare(
    folder: Path, tmp_path: Path
) -> None:
    state = tmp_path / "state.json"
    crawl_only = Discovery(folder, state, load_sources("crawl")).scan()
    assert crawl_only.workflow_ids(str(folder / "etl.py")) is None  # no manifest in use
    _manifest(folder, {"etl": "etl.py", "alpha": "sub/two.py", "beta": "sub/two.py"})
    assert Discovery(folder, state, load_sources("crawl")).scan().owners is None
    discovery = Discovery(folder, state)
    changes = discovery.scan()
    assert changes.workflow_ids(str(folder / "etl.py")) == ("etl",)
    assert changes.workflow_ids(str(folder / "sub" / "two.py")) == ("alpha", "beta")
    (folder / "stray.py").write_text(ETL)
    assert discovery.scan().workflow_ids(str(folder / "stray.py")) == ()  # crawled only


def test_a_manifest_edit_alone_queues_the_files_it_reassigns(folder: Path, tmp_path: Path) -> None:
    _manifest(folder, {"etl": "etl.py", "alpha": "sub/two.py"})
    discovery = Discovery(folder, tmp_path / "state.json")
    discovery.commit(discovery.scan())
    assert discovery.scan().changed == []
    _manifest(folder, {"etl": "etl.py", "alpha": "sub/two.py", "beta": "sub/two.py"})
    changes = discovery.scan()
    # two.py did not change, but may now declare "beta": parsed again, with its bytes.
    [(path, digest)] = changes.changed
    assert path == str(folder / "sub" / "two.py")
    assert changes.contents[digest] == TWO.encode()
    assert changes.workflow_ids(path) == ("alpha", "beta")


def test_a_custom_source_is_imported_by_name(
    folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "my_sources.py").write_text("def only_two(folder):\n    return ['sub/two.py']\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    discovery = Discovery(folder, tmp_path / "state.json", load_sources("my_sources:only_two"))
    assert [path for path, _ in discovery.scan().changed] == [str(folder / "sub" / "two.py")]
    sys.modules.pop("my_sources", None)


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        ("", "names no discovery source"),
        ("manifest,walk", "unknown discovery source 'walk'"),
        ("no_such_module_x:f", "cannot import the discovery source"),
        ("os:sep", "is not callable"),
    ],
)
def test_bad_source_lists_are_refused(spec: str, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        load_sources(spec)


def test_the_supervisor_refuses_a_bad_source_list_at_start(tmp_path: Path) -> None:
    from privsep.runner.config.loader import ConfigError, load_config
    from privsep.runner.supervisor.settings import SupervisorSettings

    env = {"PRIVSEP_HOME": str(tmp_path), "PRIVSEP__SUPERVISOR__DISCOVERY_SOURCES": "crawl,walk"}
    with pytest.raises(ConfigError, match="discovery_sources unknown discovery source 'walk'"):
        SupervisorSettings.from_config(load_config(None, env))


# --- attacks: the supervisor reads as root what workflow authors put in the folder -----------


@pytest.fixture
def root_only_secret(tmp_path: Path) -> Path:
    secret = tmp_path / "private" / "secret.py"
    secret.parent.mkdir(mode=0o700)
    secret.write_text("TOKEN = 'do-not-copy-me'\n")
    secret.chmod(0o600)
    return secret


def _contents(discovery: Discovery) -> bytes:
    return b"".join(discovery.scan().contents.values())


def test_a_symlink_out_of_the_folder_is_not_read(
    folder: Path, tmp_path: Path, root_only_secret: Path
) -> None:
    (folder / "leak.py").symlink_to(root_only_secret)
    _manifest(folder, {"leak": "leak.py"})
    discovery = Discovery(folder, tmp_path / "state.json")
    changes = discovery.scan()
    assert str(folder / "leak.py") not in changes.seen
    assert b"do-not-copy-me" not in b"".join(changes.contents.values())
    # A symlink inside the folder is fine.
    (folder / "alias.py").symlink_to(folder / "etl.py")
    assert str(folder / "alias.py") in discovery.scan().seen


def test_a_file_swapped_for_a_symlink_after_it_was_read_is_refused(
    folder: Path, tmp_path: Path, root_only_secret: Path
) -> None:
    discovery = Discovery(folder, tmp_path / "state.json")
    discovery.commit(discovery.scan())
    target = folder / "etl.py"
    target.unlink()
    target.symlink_to(root_only_secret)
    changes = discovery.scan()
    assert str(target) in changes.deleted
    assert b"do-not-copy-me" not in b"".join(changes.contents.values())


def test_a_manifest_entry_through_a_symlinked_directory_is_refused(
    folder: Path, tmp_path: Path, root_only_secret: Path
) -> None:
    (folder / "elsewhere").symlink_to(root_only_secret.parent)
    _manifest(folder, {"leak": "elsewhere/secret.py"})
    assert b"do-not-copy-me" not in _contents(Discovery(folder, tmp_path / "state.json"))


def test_a_fifo_and_an_oversized_file_are_skipped_not_waited_for(
    folder: Path, tmp_path: Path
) -> None:
    os.mkfifo(folder / "pipe.py")
    with open(folder / "huge.py", "wb") as fh:
        fh.truncate(5 << 20)  # sparse: costs no disk
    discovery = Discovery(folder, tmp_path / "state.json")
    changes = _within(5, folder / "pipe.py", discovery.scan)
    assert sorted(changes.seen) == [str(folder / "etl.py"), str(folder / "sub" / "two.py")]


# --- runner manifest check / generate ----------------------------------------------------------


def test_generate_then_check_round_trip(folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["manifest", "generate", "--workflows", str(folder)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == {"workflows": {"alpha": "sub/two.py", "beta": "sub/two.py", "etl": "etl.py"}}
    assert not (folder / "manifest.json").exists()  # stdout only, without --write

    assert main(["manifest", "generate", "--workflows", str(folder), "--write"]) == 0
    assert json.loads((folder / "manifest.json").read_text()) == printed
    assert main(["manifest", "check", "--workflows", str(folder)]) == 0
    assert "lists every definition file" in capsys.readouterr().out

    assert main(["manifest", "generate", "--workflows", str(folder), "--write"]) == 1
    assert "exists: pass --force" in capsys.readouterr().err
    (folder / "dyn.py").write_text(DYNAMIC)
    assert main(["manifest", "generate", "--workflows", str(folder), "--write", "--force"]) == 0
    assert "not listed: dyn.py: no Workflow with a literal id" in capsys.readouterr().err


def test_check_reports_missing_gone_and_misnamed_files(
    folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (folder / "dyn.py").write_text(DYNAMIC)
    _manifest(folder, {"etl": "etl.py", "gamma": "etl.py", "gone": "gone.py", "x": "dyn.py"})
    assert main(["manifest", "check", "--workflows", str(folder)]) == 1
    out = capsys.readouterr()
    assert "gamma: etl.py declares etl" in out.out
    assert "gone: gone.py does not exist" in out.out
    assert "missing from the manifest: sub/two.py (alpha, beta)" in out.out
    assert "cannot tell without running it: x: dyn.py" in out.out
    assert "3 problems" in out.err


def test_generate_refuses_a_workflow_id_declared_twice(
    folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (folder / "copy.py").write_text(ETL)
    assert main(["manifest", "generate", "--workflows", str(folder), "--write"]) == 1
    err = capsys.readouterr().err
    assert "workflow 'etl' is declared in copy.py and etl.py" in err
    assert "nothing written" in err
    assert not (folder / "manifest.json").exists()


def test_check_without_a_manifest_or_folder_says_what_to_do(
    folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["manifest", "check", "--workflows", str(folder)]) == 1
    assert "runner manifest generate --write" in capsys.readouterr().err
    assert main(["manifest", "check", "--workflows", str(tmp_path / "nope")]) == 1
    assert "does not exist" in capsys.readouterr().err
    (folder / "manifest.json").write_text("{")
    assert main(["manifest", "check", "--workflows", str(folder)]) == 1
    err = capsys.readouterr().err
    assert "not valid JSON" in err and "Traceback" not in err


def test_crawl_skips_private_names(folder: Path) -> None:
    (folder / "_private.py").write_text("")
    (folder / ".hidden.py").write_text("")
    (folder / "__pycache__").mkdir()
    (folder / "__pycache__" / "x.py").write_text("")
    assert crawl(folder) == [str(folder / "etl.py"), str(folder / "sub" / "two.py")]


def test_check_does_not_read_an_oversized_file(
    folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _manifest(folder, {"etl": "etl.py", "alpha": "sub/two.py", "beta": "sub/two.py"})
    with open(folder / "huge.py", "wb") as fh:
        fh.truncate(5 << 20)  # sparse: costs no disk
    assert main(["manifest", "check", "--workflows", str(folder)]) == 1
    assert "missing from the manifest: huge.py (it is larger than 4 MiB)" in capsys.readouterr().out
