"""Will a sandbox be able to read what it needs? A check for ``runner check-perms``.

Inside a sandbox, every bound path's *parents* are fresh 0755 directories (so a bundle or an
interpreter under a 0700 ``/root`` is reachable), but the bound tree itself keeps its modes. The
sandbox runs as a pool uid that owns nothing and has no groups, so it reads through the "other"
permission bits only. This module finds what those bits deny, with the command that fixes it.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass


@dataclass(frozen=True)
class Unreadable:
    """One path under a bound tree that the sandbox uid cannot use."""

    path: str
    why: str
    fix: str

    def __str__(self) -> str:
        return f"{self.path}: {self.why} (fix: {self.fix})"


def unreadable_by_sandbox(
    roots: list[str], *, limit: int = 20, max_entries: int = 100_000
) -> list[Unreadable]:
    """Paths under ``roots`` that a sandbox uid could not read (files) or list (directories).

    Stops after ``limit`` findings or ``max_entries`` entries walked. Symlinks are not followed
    (the sandbox sees them, but their targets must be bound separately to be reachable).
    """
    found: list[Unreadable] = []
    walked = 0
    for root in roots:
        stack = [root]
        while stack and len(found) < limit and walked < max_entries:
            path = stack.pop()
            walked += 1
            try:
                st = os.lstat(path)
            except OSError as exc:
                found.append(Unreadable(path, f"cannot stat: {exc.strerror}", "check the path"))
                continue
            mode = st.st_mode
            if stat.S_ISLNK(mode):
                continue
            if stat.S_ISDIR(mode):
                if mode & 0o005 != 0o005:
                    found.append(
                        Unreadable(
                            path,
                            f"directory mode {stat.S_IMODE(mode):04o} lacks o+rx",
                            f"chmod -R o+rX {root}",
                        )
                    )
                    continue
                try:
                    names = os.listdir(path)
                except OSError as exc:
                    found.append(Unreadable(path, f"cannot list: {exc.strerror}", "check the path"))
                    continue
                stack.extend(os.path.join(path, n) for n in sorted(names, reverse=True))
            elif stat.S_ISREG(mode) and not mode & 0o004:
                found.append(
                    Unreadable(
                        path,
                        f"file mode {stat.S_IMODE(mode):04o} lacks o+r",
                        f"chmod -R o+rX {root}",
                    )
                )
    return found
