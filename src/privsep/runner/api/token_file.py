"""The shared session-token file between ``runner token-refresher`` and the supervisor.

The refresher holds the long-lived key and writes only what the key bought: one supervisor
session token, its expiry and the supervisor id, as a small JSON document. The supervisor reads
that file instead of holding a key (``supervisor.session_token_file``). Writing and reading are
both here, so the format lives in one place.

Writing is atomic (a temporary file in the same directory, ``fsync``, mode and group set on
the open descriptor, then ``rename``): a reader sees the old token or the new one, never half
of one, and a refresher killed mid-write leaves the old token in place. The mode is 0640 and
the group is the one the supervisor reads as, so nobody else can read the token.

Reading never trusts a stale token past its expiry: :class:`SharedSession` raises
:class:`SessionNotReady` (an :class:`~privsep.runner.api.keepalive.HttpUnavailable`, so every
caller already retries it as "the server is unavailable") until the refresher has written a
token that is still valid.
"""

from __future__ import annotations

import grp
import json
import os
import stat
import time
from dataclasses import dataclass
from typing import Any

from privsep._token import Token
from privsep.runner.api.keepalive import HttpUnavailable
from privsep.secrets.files import rename_over, temporary_copy

__all__ = [
    "TOKEN_FILE_MODE",
    "SessionNotReady",
    "SharedSession",
    "check_token_file",
    "group_id",
    "make_token_dir",
    "publish",
    "write_session_token",
]

TOKEN_FILE_MODE = 0o640
# A token file is a few hundred bytes; anything much larger is not one.
_MAX_BYTES = 64 * 1024


class SessionNotReady(HttpUnavailable):
    """No usable session token in the shared file yet: missing, unreadable, expired, or the
    one the server just refused. Retry later, as for a server that does not answer."""

    def __init__(self, message: str) -> None:
        super().__init__(message, sent=False)


def group_id(group: str) -> int:
    """The gid that ``group`` names: a number, a group name, or "" for our own group."""
    if not group:
        return os.getegid()
    if group.isdigit():
        return int(group)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ValueError(f"no group named {group!r}") from None


def publish(tmp: str, path: str, *, gid: int, mode: int = TOKEN_FILE_MODE) -> None:
    """Make the finished file ``tmp`` (in ``path``'s directory) appear as ``path``: flushed to
    disk, ``mode`` and group ``gid`` set, then renamed over the old one. ``tmp`` is removed
    if anything fails."""

    def finish(fd: int) -> None:
        os.fchown(fd, -1, gid)
        os.fchmod(fd, mode)  # after the chown, which may clear set-id bits
        os.fsync(fd)

    rename_over(tmp, path, finish)
    # The rename itself is durable once the directory is.
    dfd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def make_token_dir(path: str, *, gid: int) -> None:
    """Create the token file's directory (0750, group ``gid``) when it is missing; an
    existing one is left as it is (``runner check-perms`` judges it)."""
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(directory):
        return
    os.mkdir(directory, 0o750)
    os.chown(directory, -1, gid)
    os.chmod(directory, 0o750)  # noqa: S103 - the group is the supervisor's, on purpose


def write_session_token(path: str, token: Token, *, subject: str, gid: int) -> None:
    """Write the session ``token`` (of supervisor id ``subject``) to ``path`` atomically."""
    data = json.dumps(
        {
            "token": token.reveal(),
            "expires_at": token.expires_at,
            "subject": subject,
            "written_at": int(time.time()),
        }
    ).encode()
    make_token_dir(path, gid=gid)
    publish(temporary_copy(path, data), path, gid=gid)


def _read(path: str) -> tuple[os.stat_result, dict[str, Any]]:
    """The file's identity and its document; ``SessionNotReady`` when there is none usable."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise SessionNotReady(
            f"no session token in {path} yet (is the refresher running?)"
        ) from None
    except OSError as exc:
        raise SessionNotReady(
            f"cannot read the session token file {path}: {exc.strerror}"
        ) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SessionNotReady(f"the session token file {path} is not a regular file")
        raw = os.read(fd, _MAX_BYTES + 1)
    finally:
        os.close(fd)
    try:
        doc = json.loads(raw)
        if not (isinstance(doc, dict) and isinstance(doc.get("token"), str)):
            raise ValueError("no token")
        int(doc["expires_at"])
    except (ValueError, KeyError, TypeError):
        raise SessionNotReady(f"the session token file {path} holds no session token") from None
    return st, doc


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


class SharedSession:
    """The supervisor's side: the session token the refresher keeps in ``path``. Thread-safe
    enough for its one use (the session client calls it under its own lock or not at all)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._seen: tuple[int, int, int, int] | None = None

    def __repr__(self) -> str:
        return f"SharedSession({self.path!r})"

    def changed(self) -> bool:
        """Whether the file is another one than last read (renamed over, rewritten)."""
        try:
            st = os.stat(self.path, follow_symlinks=False)
        except OSError:
            return False  # nothing newer to read; the token we hold stays in use
        return _identity(st) != self._seen

    def read(self, *, refused: Token | None = None) -> tuple[Token, dict[str, Any]]:
        """The current token and the document it came in. ``refused`` is a token the server
        has just answered 401 to: the same one again is no session either."""
        st, doc = _read(self.path)
        self._seen = _identity(st)
        token = Token(doc["token"], int(doc["expires_at"]))
        if token.expires_at <= time.time():
            raise SessionNotReady(
                f"the session token in {self.path} has expired; waiting for the refresher "
                "to write a fresh one"
            )
        if refused is not None and refused.reveal() == token.reveal():
            raise SessionNotReady(
                f"the server refused the session token in {self.path}; waiting for the "
                "refresher to write a fresh one"
            )
        return token, {"expires_at": token.expires_at, "subject": str(doc.get("subject", ""))}


@dataclass(frozen=True)
class FileHealth:
    ok: bool
    reason: str


def check_token_file(path: str, now: float | None = None) -> FileHealth:
    """``runner health --token-refresher`` in privsep mode: the shared file holds a token that
    has not expired. The refresher renews at half the token's life, so an expired token means
    it has failed to renew for at least half a lifetime, and the supervisor cannot work."""
    now = time.time() if now is None else now
    try:
        st, doc = _read(path)
    except SessionNotReady as exc:
        return FileHealth(False, str(exc))
    left = int(doc["expires_at"]) - now
    age = now - st.st_mtime
    if left <= 0:
        return FileHealth(
            False,
            f"the session token in {path} expired {-left:.0f} s ago (written {age:.0f} s ago)",
        )
    return FileHealth(
        True, f"ok: session token valid for {left:.0f} s more, written {age:.0f} s ago"
    )
