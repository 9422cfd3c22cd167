"""A supervisor started by systemd with ``LoadCredential=`` has ``CREDENTIALS_DIRECTORY`` in
its environment, pointing at its key. No sandbox may learn that name or reach that file."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from sandbox_kit import script, spec_for

from privsep.sandbox import ProcessBackend, SandboxSpec

PROBE = """
    import json, os, sys
    key = sys.argv[1]
    try:
        with open(key, "rb") as fh:
            opened = fh.read()[:0] == b""
    except OSError as exc:
        opened = exc.strerror
    print(json.dumps({"env": dict(os.environ), "opened": opened}))
"""


def test_the_credentials_directory_never_reaches_a_sandbox(
    backend: ProcessBackend, bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # systemd's layout, in a directory the sandbox uid could otherwise traverse.
    creds = bundle.parent / "credentials"
    creds.mkdir(mode=0o700)
    key = creds / "supervisor.key"
    key.write_bytes(b"-----BEGIN PRIVATE KEY-----\n")
    key.chmod(0o400)
    creds.chmod(0o500)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))

    # What the supervisor passes: the credential socket's name and nothing of its own.
    path = script(bundle, "probe.py", PROBE)
    spec = spec_for(bundle, path, str(key), env={"LANG": "C.UTF-8"})
    handle = backend.launch(spec)
    status = handle.wait(30)
    assert status is not None and status.ok, (status, handle.output().text)
    line = next(x for x in handle.output().text.splitlines() if x.startswith("{"))
    got = json.loads(line)
    assert "CREDENTIALS_DIRECTORY" not in got["env"]
    assert str(creds) not in json.dumps(got["env"])
    assert got["opened"] is not True


def test_a_spec_cannot_ask_for_it(bundle: Path) -> None:
    with pytest.raises(ValueError, match="CREDENTIALS_DIRECTORY"):
        SandboxSpec(
            kind="task",
            entry_point="privsep.sandbox.entrypoints:run_path",
            workdir=str(bundle.parent / "w"),
            env={"CREDENTIALS_DIRECTORY": os.environ.get("CREDENTIALS_DIRECTORY", "/run/x")},
        )
