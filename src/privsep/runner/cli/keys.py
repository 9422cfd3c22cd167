"""``runner keys rotate|list|retire``: the token-signing keys, on the server's host.

These are server-host commands, like ``runner supervisors register``: they read the key ring
(private keys included, which never leave this host) and write the database directly through
:mod:`privsep.server.public`. Nothing here goes through the operator API, so an operator
session alone can neither add nor retire a signing key.

- ``rotate`` adds a key that signs from then on (running servers pick it up within
  ``server.signing_keys_refresh`` seconds); older keys keep verifying, so tokens in flight
  survive it.
- ``retire KID`` makes a key verify nothing, at once in the database and on every server
  within ``server.signing_keys_refresh`` seconds, and deletes it from this host's ring. The key
  the ring signs with is refused: rotate first, so that something still signs.
"""

from __future__ import annotations

import argparse
import os
import re

from privsep.runner.cli.output import emit_json, print_table, when
from privsep.runner.cli.parsers import action, group
from privsep.runner.cli.server import database_url
from privsep.runner.config.loader import Config, load_config
from privsep.runner.errors import EXIT_USAGE, CommandError
from privsep.secrets.files import InsecureFileError, make_private_dir

# What a kid looks like (privsep.secrets.keyring.key_id): checked before anything is read, so a
# typo is a usage error and never reaches a path or a query.
_KID = re.compile(r"[A-Za-z0-9_-]{16}")


def protect_leading_dash_kid(argv: list[str]) -> list[str]:
    """``runner keys retire -x…`` with the kid moved after a ``--``, so argparse reads it as the
    KID and not as an unknown option (options after it still parse). Keys made before new kids
    stopped beginning with ``-`` (one in 64 did) retire as ``runner keys list`` prints them."""
    for i in range(len(argv) - 2):
        if argv[i : i + 2] == ["keys", "retire"]:
            rest = argv[i + 2 :]
            if "--" in rest:
                return argv
            for j, arg in enumerate(rest):
                if arg.startswith("-") and _KID.fullmatch(arg):
                    k = i + 2 + j
                    return [*argv[:k], *argv[k + 1 :], "--", arg]
            return argv
    return argv


def _ring(cfg: Config) -> str:
    return str(cfg.path_of("server.signing_keyring"))


def keys_rotate(cfg: Config) -> int:
    """Add a signing key (creating the ring on first use); old keys keep verifying."""
    from privsep.secrets.keyring import create_keyring, rotate

    ring = _ring(cfg)
    try:
        if os.path.exists(os.path.join(ring, "ring.json")):
            kid = rotate(ring)
            print(f"added signing key {kid} to {ring}; it signs from now on")
        else:
            make_private_dir(ring)
            kid = create_keyring(ring)
            print(f"created key ring {ring} with signing key {kid}")
    except InsecureFileError as exc:
        raise CommandError(f"refusing the key ring: {exc}") from None
    except OSError as exc:  # e.g. a home this user cannot write (a volume owned by another uid)
        where = exc.filename or ring
        raise CommandError(f"cannot write the key ring at {where}: {exc.strerror or exc}") from None
    return 0


def keys_list(cfg: Config, *, as_json: bool) -> int:
    from privsep.server.public import AdminError, list_signing_keys

    try:
        keys = list_signing_keys(database_url(cfg), _ring(cfg))
    except AdminError as exc:
        raise CommandError(str(exc)) from None
    if as_json:
        emit_json({"keys": keys})
        return 0
    print_table(
        ("kid", "state", "created", "retired", "in ring", "published"),
        [
            (
                k["kid"],
                k["state"],
                when(k["created_at"]),
                when(k["retired_at"]),
                k["in_ring"],
                k["published"],
            )
            for k in keys
        ],
    )
    return 0


def keys_retire(cfg: Config, kid: str) -> int:
    from privsep.server.public import AdminError, retire_signing_key

    if not _KID.fullmatch(kid):
        raise CommandError(
            f"{kid!r} is not a key id (16 characters; `runner keys list` shows them)", EXIT_USAGE
        )
    try:
        done = retire_signing_key(database_url(cfg), _ring(cfg), kid)
    except AdminError as exc:
        raise CommandError(str(exc)) from None
    refresh = float(cfg.get("server.signing_keys_refresh"))
    print(f"{done}; every server refuses its tokens within {refresh:g} s")
    return 0


def _cmd_rotate(args: argparse.Namespace) -> int:
    return keys_rotate(load_config(args.config))


def _cmd_list(args: argparse.Namespace) -> int:
    return keys_list(load_config(args.config), as_json=args.json)


def _cmd_retire(args: argparse.Namespace) -> int:
    return keys_retire(load_config(args.config), args.kid)


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``runner keys rotate|list|retire``."""
    g = group(sub, "keys", "the token-signing key ring (on the server's host)")
    action(g, "rotate", "add a signing key (creates the ring if absent)", _cmd_rotate)
    action(g, "list", "the signing keys: signing, verifying or retired", _cmd_list, json=True)
    p = action(
        g,
        "retire",
        "make a key verify nothing, on every server, and delete it from the ring",
        _cmd_retire,
    )
    p.add_argument("kid", metavar="KID")
