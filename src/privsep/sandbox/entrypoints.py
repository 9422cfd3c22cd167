"""Entry points the sandbox itself provides.

Entry points are trusted functions inside privsep, called as ``func(argv, payload)`` inside the
sandbox once ``enter()`` is done; they then load user code. The runner will bring its own for
parse, trigger and task; the one here runs a Python file, which the tests' hostile children and
the benchmark use.
"""

from __future__ import annotations

import runpy
import sys


def run_path(argv: list[str], payload: bytes) -> int:
    """Run the script ``argv[0]`` as ``__main__`` with ``sys.argv = argv``.

    ``payload`` is available to the script as ``privsep_payload`` in its globals. The exit code
    is the script's ``SystemExit`` code, or 0.
    """
    if not argv:
        print("privsep: run_path needs the script path as argv[0]", file=sys.stderr)
        return 2
    sys.argv = list(argv)
    try:
        runpy.run_path(argv[0], init_globals={"privsep_payload": payload}, run_name="__main__")
    except SystemExit as exc:
        if exc.code is None:
            return 0
        if isinstance(exc.code, int):
            return exc.code
        print(exc.code, file=sys.stderr)
        return 1
    return 0
