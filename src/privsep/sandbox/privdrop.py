"""Drop to an unprivileged uid for good, then prove the drop holds.

Modelled on OpenSSH's ``permanently_set_uid()``: set all three gids, then all three uids, then
*try to get the old ids back* and refuse to go on if that works.
"""

from __future__ import annotations

import os


class PrivilegeDropError(Exception):
    """The process could not drop, or could regain, privileges. Never run user code after it."""


def drop_privileges(uid: int, gid: int) -> None:
    """Become ``uid``/``gid`` with no supplementary groups, irreversibly.

    Must run as root. Raises :class:`PrivilegeDropError` if any step fails or if the old ids
    can be restored afterwards.
    """
    old_uid = os.geteuid()
    try:
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
    except OSError as exc:
        raise PrivilegeDropError(f"cannot switch to uid {uid} gid {gid}: {exc.strerror}") from None
    if old_uid != uid:
        try:
            os.setuid(old_uid)
        except PermissionError:
            pass
        else:
            raise PrivilegeDropError(f"was able to restore uid {old_uid} after dropping it")
    if os.getresuid() != (uid, uid, uid) or os.getresgid() != (gid, gid, gid):
        raise PrivilegeDropError(
            f"uid/gid drop incomplete: uids {os.getresuid()} gids {os.getresgid()}"
        )
    if os.getgroups():
        raise PrivilegeDropError(f"supplementary groups remain: {os.getgroups()}")
