"""``runner supervisors`` and ``runner operators``: register, list and revoke the principals
that hold a long-lived key. Server-host commands: they write the database directly, through
:mod:`privsep.server.public`, and take effect on every server replica at the next call."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from privsep.runner.cli.output import emit_json, print_table, when
from privsep.runner.cli.parsers import action, group
from privsep.runner.errors import EXIT_OK, CommandError

if TYPE_CHECKING:
    from privsep.runner.config.loader import Config

# What each kind calls the moment it was last seen, in the list's JSON and its table.
_LAST_SEEN = {
    "supervisor": ("last_heartbeat_at", "last heartbeat"),
    "operator": ("last_session_at", "last session"),
}


def _config(args: argparse.Namespace) -> Config:
    from privsep.runner.config.loader import load_config

    return load_config(args.config)


def _url(args: argparse.Namespace) -> str:
    from privsep.runner.cli.server import database_url

    return database_url(_config(args))


def cmd_register(args: argparse.Namespace) -> int:
    from privsep.server.public import AdminError, register_operator, register_supervisor

    kind: str = args.principal_kind
    register = register_supervisor if kind == "supervisor" else register_operator
    try:
        principal_id = register(_url(args), args.name, args.public_key, replace=args.replace)
    except AdminError as exc:
        raise CommandError(str(exc)) from None
    print(f"registered {kind} {args.name} (id {principal_id})")
    return EXIT_OK


def cmd_list(args: argparse.Namespace) -> int:
    from privsep.server.public import AdminError, list_operators, list_supervisors

    kind: str = args.principal_kind
    listing = list_supervisors if kind == "supervisor" else list_operators
    seen_key, seen_header = _LAST_SEEN[kind]
    try:
        rows: list[dict[str, Any]] = [p.as_json(seen_key) for p in listing(_url(args))]
    except AdminError as exc:
        raise CommandError(str(exc)) from None
    if args.json:
        emit_json({f"{kind}s": rows})
        return EXIT_OK
    print_table(
        ("name", "key", "registered", seen_header, "state"),
        [
            (
                row["name"],
                row["key"],
                when(row["registered_at"]),
                when(row[seen_key]),
                row["state"] if row["state"] == "active" else f"revoked {when(row['revoked_at'])}",
            )
            for row in rows
        ],
    )
    return EXIT_OK


def cmd_revoke(args: argparse.Namespace) -> int:
    from privsep.server.public import AdminError, revoke_operator, revoke_supervisor

    kind: str = args.principal_kind
    revoke = revoke_supervisor if kind == "supervisor" else revoke_operator
    try:
        done = revoke(_url(args), args.name)
    except AdminError as exc:
        raise CommandError(str(exc)) from None
    if not done.was_active:
        print(f"{kind} {args.name} was already revoked")
        return EXIT_OK
    taken = done.taken_back
    held = (
        f"; took back {taken.attempts} running attempts, {taken.parse_jobs} parse jobs and "
        f"{taken.triggers} triggers"
        if kind == "supervisor"
        else ""
    )
    print(f"revoked {kind} {args.name}: its sessions end at their next call{held}")
    return EXIT_OK


def register(sub: Any) -> None:
    """Add ``runner supervisors|operators register|list|revoke``."""
    for kind, what in (
        ("supervisor", "registered supervisors (server host)"),
        ("operator", "registered operator credentials (server host)"),
    ):
        actions = group(sub, f"{kind}s", what)
        p = action(actions, "register", f"register a {kind}'s Ed25519 public key", cmd_register)
        p.add_argument("name")
        p.add_argument(
            "--public-key",
            required=True,
            metavar="FILE",
            help="the PATH.pub that `runner credentials create` wrote",
        )
        p.add_argument(
            "--replace",
            action="store_true",
            help=f"re-key (or re-activate) an existing {kind}; a new key ends its sessions",
        )
        p.set_defaults(principal_kind=kind)
        p = action(
            actions, "list", f"every registered {kind}, revoked ones too", cmd_list, json=True
        )
        p.set_defaults(principal_kind=kind)
        p = action(
            actions,
            "revoke",
            f"revoke a {kind}: its sessions end at once"
            + (" and the work it holds is taken back" if kind == "supervisor" else ""),
            cmd_revoke,
        )
        p.add_argument("name")
        p.set_defaults(principal_kind=kind)
