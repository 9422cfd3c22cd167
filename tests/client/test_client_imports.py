"""What importing the SDK loads, in a fresh interpreter.

``import privsep.client`` runs in every sandbox before user code, so it must pull in nothing
trusted (tests/test_client_isolation.py checks that too, with a requests-only venv) and stay
lean: ``requests`` (about 200 ms) only when the sandbox calls the API directly, ``asyncio``
only in the trigger sandbox. The entry points the sandbox calls are checked the same way.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"

TRUSTED = (
    "privsep.server",
    "privsep.runner",
    "privsep.sandbox",
    "privsep.secrets",
    "sqlalchemy",
    "fastapi",
    "starlette",
    "pydantic",
    "uvicorn",
    "cryptography",
    "jwt",
    "docker",
    "psutil",
    "psycopg",
    "alembic",
)

PROBE = """
import json, sys
before = set(sys.modules)
for name in sys.argv[1:]:
    __import__(name)
print(json.dumps(sorted(set(sys.modules) - before)))
"""


def loaded_by(*modules: str) -> set[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PYTHONPATH"] = str(SRC)
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, *modules],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return set(json.loads(proc.stdout))


def under(names: set[str], *prefixes: str) -> list[str]:
    return sorted(n for n in names if any(n == p or n.startswith(p + ".") for p in prefixes))


def test_import_privsep_client_pulls_nothing_trusted_and_nothing_heavy() -> None:
    names = loaded_by("privsep.client")
    assert under(names, *TRUSTED) == []
    assert under(names, "requests", "urllib3", "asyncio") == []
    assert under(names, "privsep.client._http", "privsep.client._parse") == []


@pytest.mark.parametrize(
    "entry", ["privsep.client._parse", "privsep.client._task", "privsep.client._trigger"]
)
def test_entry_points_pull_nothing_trusted(entry: str) -> None:
    names = loaded_by(entry)
    assert under(names, *TRUSTED) == []
    assert under(names, "requests") == []  # only once PRIVSEP_API_URL is set


def test_direct_http_brings_requests_and_still_nothing_trusted() -> None:
    names = loaded_by("privsep.client._http")
    assert "requests" in names
    assert under(names, *TRUSTED) == []


def test_the_supervisor_can_import_the_wire_protocol_alone() -> None:
    names = loaded_by("privsep.client._wire")
    assert under(names, *TRUSTED, "requests") == []
