"""Shared helpers for tests that drive the real ``runner`` command and build real files.

Nothing here mocks anything: ``run_runner`` starts ``python -m privsep`` in a subprocess with a
clean environment, and the file helpers create real files with exactly the mode asked for
(``fchmod`` after creation, so the umask cannot interfere).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

# Long enough for a slow CI box, short enough that a command that blocks (say, on a FIFO)
# fails the test instead of hanging the suite.
RUNNER_TIMEOUT = 20.0


def clean_env(
    home: str | os.PathLike[str] | None = None, extra: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The current environment without any ``PRIVSEP*`` variable, plus ``PRIVSEP_HOME``.

    Removing ``PRIVSEP_HOME``, ``PRIVSEP_CONFIG`` and every ``PRIVSEP__SECTION__KEY`` keeps a
    developer's own settings from leaking into a test.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("PRIVSEP")}
    if home is not None:
        env["PRIVSEP_HOME"] = str(home)
    if extra:
        env.update(extra)
    return env


def run_runner(
    *args: str | os.PathLike[str],
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    timeout: float = RUNNER_TIMEOUT,
    umask: int = -1,
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m privsep *args`` and return its exit status and text output.

    ``env`` defaults to :func:`clean_env` with no home; ``umask`` (when not -1) is set in the
    child before it starts.
    """
    return subprocess.run(
        [sys.executable, "-m", "privsep", *(os.fspath(a) for a in args)],
        env=dict(clean_env() if env is None else env),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        umask=umask,
        check=False,
    )


def write_file(path: str | os.PathLike[str], data: bytes = b"secret\n", mode: int = 0o600) -> Path:
    """Create ``path`` (which must not exist) holding ``data`` with exactly ``mode``."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fchmod(fd, mode)
    finally:
        os.close(fd)
    return Path(path)


def make_dir(path: str | os.PathLike[str], mode: int = 0o700) -> Path:
    """Create the directory ``path`` with exactly ``mode`` (sticky bit included)."""
    os.mkdir(path)
    os.chmod(path, mode)
    return Path(path)


def mode_of(path: str | os.PathLike[str]) -> int:
    """Permission bits of ``path`` itself (a symlink is not followed)."""
    return os.lstat(path).st_mode & 0o7777


def finding_line(output: str, path: str | os.PathLike[str], *words: str) -> str:
    """The one line of ``check-perms`` text output about ``path`` that contains ``words``.

    Fails with the whole output when there is no such line, so a failure shows what was said.
    """
    prefix = f"{os.fspath(path)}: "
    lines = [
        line
        for line in output.splitlines()
        if line.startswith(prefix) and all(w in line for w in words)
    ]
    assert lines, f"no finding for {prefix!r} containing {words!r} in:\n{output}"
    return lines[0]


def readable_memory(pid: int) -> Iterator[bytes]:
    """Each readable mapping of process ``pid``'s memory, read through ``/proc/PID/mem`` (as
    root): what a test searches for a secret that must not be there. Opening raises
    ``OSError`` if the process is gone; a mapping that cannot be read is skipped."""
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", 0) as mem:
        for line in maps:
            fields = line.split()
            if "r" not in fields[1] or (len(fields) > 5 and fields[5] == "[vvar]"):
                continue
            start, end = (int(x, 16) for x in fields[0].split("-"))
            try:
                mem.seek(start)
                data = mem.read(end - start)
            except (OSError, OverflowError, ValueError):
                continue
            if data:
                yield data
