"""The user process's exit (``_exit.call_and_exit``) behaves as a normal interpreter exit.

Differential tests: each program runs once as ``sys.exit(main())`` under a plain interpreter and
once as ``call_and_exit(main)``; status, output and side effects must match. Then the same
observable effects are checked through real sandboxes in every launch mode.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from sandbox_kit import script, spec_for

from privsep.sandbox import ExitReason, ProcessBackend

PROGRAMS = {
    "return_none": "def main():\n    print('out', end='')\n",
    "return_int": "def main():\n    return 3\n",
    "exit_int": "def main():\n    sys.exit(3)\n",
    "exit_string": "def main():\n    sys.exit('bad things happened')\n",
    "exit_big": "def main():\n    sys.exit(256 + 7)\n",
    "exit_negative": "def main():\n    sys.exit(-1)\n",
    "raise": "def main():\n    print('before')\n    1/0\n",
    "atexit": textwrap.dedent(
        """\
        def main():
            atexit.register(lambda: open(OUT, 'a').write('atexit ran\\n'))
            atexit.register(lambda: print('atexit print', end=''))
            return 5
        """
    ),
    "thread": textwrap.dedent(
        """\
        def main():
            def late():
                time.sleep(0.3)
                open(OUT, 'a').write('thread finished\\n')
                print('thread print', end='')
            threading.Thread(target=late).start()
            threading.Thread(target=time.sleep, args=(3600,), daemon=True).start()
        """
    ),
    "open_file": textwrap.dedent(
        """\
        KEEP = []
        def main():
            f = open(OUT, 'w')
            f.write('never closed\\n')
            KEEP.append(f)
            KEEP.append(KEEP)  # a cycle, as a module's globals would make
        """
    ),
    "interrupt": "def main():\n    raise KeyboardInterrupt\n",
}
PRELUDE = "import atexit, os, sys, threading, time\nOUT = sys.argv[1]\n"


def _run(program: str, tail: str, out: Path) -> subprocess.CompletedProcess[str]:
    code = PRELUDE + PROGRAMS[program] + tail
    return subprocess.run(
        [sys.executable, "-I", "-c", code, str(out)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@pytest.mark.parametrize("program", sorted(PROGRAMS))
def test_call_and_exit_matches_a_normal_exit(program: str, tmp_path: Path) -> None:
    ref_out, our_out = tmp_path / "ref.txt", tmp_path / "ours.txt"
    ref = _run(program, "sys.exit(main())\n", ref_out)
    ours = _run(
        program,
        "from privsep.sandbox._exit import call_and_exit\ncall_and_exit(main)\n",
        our_out,
    )
    assert ours.returncode == ref.returncode, (ours.stderr, ref.stderr)
    assert ours.stdout == ref.stdout
    # Tracebacks name different frames; the message lines must match.
    assert ours.stderr.splitlines()[-1:] == ref.stderr.splitlines()[-1:]
    ref_text = ref_out.read_text() if ref_out.exists() else None
    our_text = our_out.read_text() if our_out.exists() else None
    assert our_text == ref_text


def test_failed_stdout_flush_gives_120(tmp_path: Path) -> None:
    code = (
        "import os, sys\n"
        "from privsep.sandbox._exit import call_and_exit\n"
        "def main():\n"
        "    sys.stdout.write('x' * 100)\n"
        "    os.close(1)\n"
        "call_and_exit(main)\n"
    )
    ours = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, timeout=30)
    ref = subprocess.run(
        [sys.executable, "-I", "-c", code.replace("call_and_exit(main)", "sys.exit(main())")],
        capture_output=True,
        timeout=30,
    )
    assert ours.returncode == ref.returncode == 120


EXIT_EFFECTS = """
    import atexit, sys, threading, time
    log = open("effects.txt", "w")  # never closed: must still be flushed
    def late():
        time.sleep(0.3)
        log.write("thread done\\n")
    threading.Thread(target=late).start()
    atexit.register(lambda: log.write("atexit ran\\n"))
    print("unflushed", end="")
    sys.exit(sys.argv[1] if sys.argv[1] != "3" else 3)
"""


@pytest.mark.parametrize(("arg", "code"), [("3", 3), ("a message", 1)])
def test_sandbox_exit_runs_threads_atexit_and_flushes(
    backend: ProcessBackend, bundle: Path, arg: str, code: int
) -> None:
    spec = spec_for(bundle, script(bundle, "effects.py", EXIT_EFFECTS), arg)
    handle = backend.launch(spec)
    status = handle.wait(30)
    assert status is not None and status.reason is ExitReason.FAILED, handle.output().text
    assert status.exit_code == code
    text = handle.output().text
    assert "unflushed" in text
    assert ("a message" in text) == (arg == "a message")
    effects = (Path(spec.workdir) / "effects.txt").read_text()
    assert effects == "thread done\natexit ran\n"
