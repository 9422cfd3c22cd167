"""The client SDK must load with nothing but ``requests`` installed and pull in nothing trusted.

import-linter checks the import graph statically; these tests check what actually happens at
run time, including in a fresh virtual environment that has only ``requests`` in it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"

# Top-level names; a submodule (privsep.runner.config.loader, cryptography.hazmat) counts as its
# parent.
FORBIDDEN = (
    "privsep.server",
    "privsep.runner",
    "privsep.sandbox",
    "privsep.secrets",
    "sqlalchemy",
    "fastapi",
    "cryptography",
    "jwt",
    "docker",
    "psutil",
    # the rest of the trusted extras
    "alembic",
    "celery",
    "croniter",
    "daemon",
    "psycopg",
    "pyseccomp",
    "rich",
    "uvicorn",
)

# Imports the module named in argv[1] and reports, as JSON, where it came from and which
# forbidden modules are loaded afterwards.
PROBE = """
import importlib, json, sys
forbidden = json.loads(sys.argv[2])
module = importlib.import_module(sys.argv[1])
loaded = sorted(
    name for name in sys.modules
    if any(name == f or name.startswith(f + ".") for f in forbidden)
)
print(json.dumps({
    "file": module.__file__,
    "loaded": loaded,
    "in_venv": sys.prefix != sys.base_prefix,
}))
"""


def _clean_env(**extra: str) -> dict[str, str]:
    """An environment without the caller's PYTHON* settings, with ``src`` on the path."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PYTHONPATH"] = str(SRC)
    env["PYTHONNOUSERSITE"] = "1"
    env.update(extra)
    return env


def _probe(python: str, module: str) -> dict[str, object]:
    proc = subprocess.run(
        [python, "-c", PROBE, module, json.dumps(FORBIDDEN)],
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, f"importing {module} with {python} failed:\n{proc.stderr}"
    result: dict[str, object] = json.loads(proc.stdout)
    return result


def test_client_imports_nothing_trusted() -> None:
    result = _probe(sys.executable, "privsep.client")
    assert result["file"] == str(SRC / "privsep" / "client" / "__init__.py")
    assert result["loaded"] == []


def test_probe_sees_trusted_imports() -> None:
    # The control: the same probe does report a trusted module when one is imported.
    result = _probe(sys.executable, "privsep.runner.config.loader")
    loaded = result["loaded"]
    assert isinstance(loaded, list)
    assert "privsep.runner" in loaded
    assert "privsep.secrets" in loaded


@pytest.mark.slow
def test_client_imports_in_venv_with_only_requests(tmp_path: Path) -> None:
    env_dir = tmp_path / "venv"
    # No pip inside: the outer pip installs into it (faster than bootstrapping a second pip).
    venv.EnvBuilder(system_site_packages=False, with_pip=False, clear=True).create(env_dir)
    python = str(env_dir / "bin" / "python")
    install = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            python,
            "install",
            "-q",
            "--disable-pip-version-check",
            "requests",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert install.returncode == 0, f"pip install requests failed:\n{install.stderr}"

    result = _probe(python, "privsep.client")
    assert result["in_venv"] is True
    assert result["file"] == str(SRC / "privsep" / "client" / "__init__.py")
    assert result["loaded"] == []

    # requests is there (the client may use it) ...
    assert _probe(python, "requests")["in_venv"] is True
    # ... and the trusted dependencies really are not, so the check above means something.
    for name in ("cryptography", "jwt", "fastapi", "sqlalchemy", "psutil"):
        proc = subprocess.run(
            [python, "-c", f"import {name}"],
            env=_clean_env(),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert proc.returncode != 0, f"{name} is importable in the requests-only venv"
        assert "ModuleNotFoundError" in proc.stderr
