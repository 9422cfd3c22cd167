"""Start a command as another uid on a host whose Python lives under root's 0700 home.

The test interpreter (and so ``python -m privsep``) may sit under ``/root``, which no other
uid can enter. The child gets a private mount namespace in which ``/root`` is a 0755 tmpfs
holding binds of root's own entries, each with its own mode as before: the interpreter's
directories are readable, as they are to a sandbox, and nothing else changes. Then it drops to
the uid, for good, before exec.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

from privsep.sandbox import _libc as libc

HIDDEN_HOME = "/root"


def as_user(uid: int, gid: int, groups: Sequence[int] = ()) -> Callable[[], None]:
    """A ``preexec_fn`` for :class:`subprocess.Popen` (pass no ``user=``/``group=``)."""

    def enter() -> None:
        libc.unshare(libc.CLONE_NEWNS)
        libc.mount(None, "/", None, libc.MS_REC | libc.MS_PRIVATE, None)
        if os.path.isdir(HIDDEN_HOME) and os.stat(HIDDEN_HOME).st_mode & 0o005 != 0o005:
            entries = {
                name: os.open(os.path.join(HIDDEN_HOME, name), os.O_PATH | os.O_NOFOLLOW)
                for name in os.listdir(HIDDEN_HOME)
            }
            libc.mount("tmpfs", HIDDEN_HOME, "tmpfs", 0, "mode=0755")
            for name, fd in entries.items():
                target = os.path.join(HIDDEN_HOME, name)
                if os.path.isdir(f"/proc/self/fd/{fd}"):
                    os.mkdir(target)
                else:
                    os.close(os.open(target, os.O_CREAT | os.O_WRONLY, 0o600))
                libc.mount(f"/proc/self/fd/{fd}", target, None, libc.MS_BIND | libc.MS_REC, None)
                os.close(fd)
        os.setgroups(list(groups))
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)

    return enter
