"""The ``runner`` command line.

Every failure a user can cause ends here as one or two lines on stderr and a non-zero exit
status, never a traceback: 2 for usage and configuration errors, 1 for everything else that a
command refuses (a permission violation, an existing file it will not overwrite).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from privsep import __version__
from privsep.runner.cli import api_spec as api_cmd
from privsep.runner.cli import keys as keys_cmd
from privsep.runner.cli import manifest as manifest_cmd
from privsep.runner.cli import operator as operator_cmd
from privsep.runner.cli import principals as principals_cmd
from privsep.runner.cli import refresher as refresher_cmd
from privsep.runner.cli import ui as ui_cmd
from privsep.runner.cli.parsers import Handler, action, group, seconds_option
from privsep.runner.errors import EXIT_OK, EXIT_USAGE, CommandError
from privsep.runner.selftest import command as selftest_cmd

if TYPE_CHECKING:
    from privsep.runner.config.loader import Config


def _load(args: argparse.Namespace) -> Config:
    from privsep.runner.config.loader import load_config

    return load_config(args.config)


def cmd_config_list(args: argparse.Namespace) -> int:
    cfg = _load(args)
    rows = [(name, s.display, s.source) for name, s in cfg.settings.items()]
    if args.json:
        print(
            json.dumps(
                {
                    "config_file": str(cfg.path),
                    "file_exists": cfg.file_exists,
                    "settings": [{"key": n, "value": v, "source": src} for n, v, src in rows],
                },
                indent=2,
            )
        )
        return EXIT_OK
    state = "" if cfg.file_exists else " (absent: defaults and environment only)"
    print(f"# config file: {cfg.path}{state}")
    width = max(len(n) for n, _, _ in rows)
    for name, value, source in rows:
        print(f"{name:<{width}}  = {value!s:<24}  [{source}]")
    return EXIT_OK


def cmd_config_get(args: argparse.Namespace) -> int:
    from privsep.runner.config.schema import BY_NAME

    if args.key not in BY_NAME:
        import difflib

        close = difflib.get_close_matches(args.key, list(BY_NAME), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise CommandError(
            f"unknown key {args.key!r}{hint}; `runner config list` shows all", EXIT_USAGE
        )
    setting = _load(args).settings[args.key]
    if args.json:
        print(json.dumps({"key": args.key, "value": setting.display, "source": setting.source}))
    else:
        print(f"{setting.display}\t[{setting.source}]")
    return EXIT_OK


def cmd_config_default(args: argparse.Namespace) -> int:
    from privsep.runner.config.rendering import render_default_toml

    sys.stdout.write(render_default_toml())
    return EXIT_OK


def cmd_config_reference(args: argparse.Namespace) -> int:
    from privsep.runner.config.rendering import render_reference_markdown

    sys.stdout.write(render_reference_markdown())
    return EXIT_OK


def cmd_check_perms(args: argparse.Namespace) -> int:
    from privsep.runner.config.check_perms import run_check_perms

    return run_check_perms(_load(args), as_json=args.json, component=args.component)


def cmd_credentials_create(args: argparse.Namespace) -> int:
    from privsep.runner.cli.credentials import create_credential

    return create_credential(args.out)


def cmd_server(args: argparse.Namespace) -> int:
    from privsep.runner.cli.server import run_server

    return run_server(_load(args))


def cmd_scheduler(args: argparse.Namespace) -> int:
    from privsep.runner.cli.server import run_scheduler

    return run_scheduler(_load(args))


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    from privsep.runner.cli.server import db_upgrade

    return db_upgrade(_load(args))


def cmd_db_check(args: argparse.Namespace) -> int:
    from privsep.runner.cli.server import db_check

    return db_check(_load(args))


def cmd_supervisor(args: argparse.Namespace) -> int:
    from privsep.runner.supervisor.daemon import run_supervisor

    return run_supervisor(_load(args), config_path=args.config, daemon=args.daemon)


def cmd_health(args: argparse.Namespace) -> int:
    from privsep.runner.cli.health import check

    component = "token-refresher" if args.token_refresher else args.component
    result = check(_load(args), component, args.max_age)
    print(result.reason)
    return 0 if result.ok else 1


def cmd_logs(args: argparse.Namespace) -> int:
    from privsep.runner.cli.remote_logs import show_logs

    return show_logs(
        _load(args), args.attempt, follow=args.follow, as_json=args.json, local=args.local
    )


def cmd_standalone(args: argparse.Namespace) -> int:
    from pathlib import Path

    from privsep.runner.cli.standalone import Options, bundled_examples, run_standalone
    from privsep.runner.config.loader import default_home

    home = Path(args.home).expanduser().resolve() if args.home else default_home(os.environ)
    workflows = Path(args.workflows).expanduser() if args.workflows else bundled_examples()
    if args.parallelism is not None and args.parallelism < 1:
        raise CommandError("--parallelism must be at least 1", EXIT_USAGE)
    return run_standalone(
        Options(
            home=home,
            workflows=workflows,
            once=args.once,
            parallelism=args.parallelism,
            as_json=args.json,
        )
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="runner",
        description="privsep: run untrusted workflow code without long-lived secrets.",
    )
    parser.add_argument("--version", action="version", version=f"privsep {__version__}")
    parser.add_argument(
        "--config",
        metavar="PATH",
        help="configuration file (default: $PRIVSEP_CONFIG or $PRIVSEP_HOME/privsep.toml)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    g = group(sub, "config", "show the effective configuration")
    action(g, "list", "every key, its effective value and its source", cmd_config_list, json=True)
    p = action(g, "get", "one key's effective value and source", cmd_config_get, json=True)
    p.add_argument("key", metavar="SECTION.KEY")
    action(g, "default", "print the documented default privsep.toml", cmd_config_default)
    action(
        g,
        "reference",
        "print the configuration reference (docs/configuration.md)",
        cmd_config_reference,
    )

    p = action(
        sub, "check-perms", "check every file that holds a secret", cmd_check_perms, json=True
    )
    p.add_argument(
        "--for",
        dest="component",
        choices=("token-refresher",),
        default="",
        help="check what runner token-refresher holds (the key or keytab), not the supervisor's",
    )

    g = group(sub, "credentials", "create the supervisor's long-lived credential")
    p = action(
        g,
        "create",
        "write a new Ed25519 key pair; print the public key",
        cmd_credentials_create,
    )
    p.add_argument(
        "--out",
        required=True,
        metavar="PATH",
        help="where to write the private key (PATH.pub gets the public key)",
    )

    action(sub, "server", "serve the internal API (TCP and unix socket)", cmd_server)
    action(
        sub,
        "scheduler",
        "run the scheduler on its own (it also runs in every runner server)",
        cmd_scheduler,
    )

    g = group(sub, "db", "the metadata database")
    action(g, "upgrade", "apply migrations (idempotent)", cmd_db_upgrade)
    action(g, "check", "current vs head revision; exit 1 if they differ", cmd_db_check)

    principals_cmd.register(sub)

    refresher_cmd.register(sub)
    p = action(sub, "supervisor", "run the supervisor (claims and sandboxes work)", cmd_supervisor)
    p.add_argument(
        "--daemon",
        action="store_true",
        help="detach (pid file and log in the state directory); without systemd",
    )

    p = action(
        sub, "standalone", "server + supervisor on this host, in one command", cmd_standalone
    )
    p.add_argument("--home", metavar="DIR", help="PRIVSEP_HOME to use (created on first run)")
    p.add_argument(
        "--workflows",
        metavar="DIR",
        help="folder of workflow definition files (default: the bundled examples)",
    )
    p.add_argument(
        "--once",
        action="store_true",
        help="run every workflow once, print a summary, exit 0 if all succeeded",
    )
    p.add_argument("--parallelism", type=int, metavar="N", help="tasks run at once")
    p.add_argument("--json", action="store_true", help="with --once: the summary as JSON")

    p = action(
        sub,
        "health",
        "is the supervisor's loop turning (or the server up)? exit 0 or 1",
        cmd_health,
    )
    seconds_option(
        p, "--max-age", "oldest acceptable heartbeat (default: 3 heartbeat intervals + 10 s)"
    )
    p.add_argument(
        "--component",
        choices=("supervisor", "server", "token-refresher", "auto"),
        default="supervisor",
        help="what to check: the supervisor's heartbeat, the server's /v1/health on "
        "server.bind, the token-refresher's token file or ticket cache, or auto: whichever "
        "of them PID 1 runs (a container's HEALTHCHECK)",
    )
    p.add_argument(
        "--token-refresher",
        action="store_true",
        help="the same as --component token-refresher",
    )

    p = action(sub, "logs", "show an attempt's log (from the server)", cmd_logs, json=True)
    p.add_argument("attempt", metavar="ATTEMPT")
    p.add_argument("--follow", "-f", action="store_true", help="keep printing while it runs")
    p.add_argument("--local", action="store_true", help="read this node's copy, not the server's")

    api_cmd.register(sub)
    keys_cmd.register(sub)
    manifest_cmd.register(sub)
    selftest_cmd.register(sub)
    operator_cmd.register(sub)
    ui_cmd.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from privsep.runner.config.loader import ConfigError

    words = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(keys_cmd.protect_leading_dash_kid(words))
    handler: Handler = args.handler
    try:
        return handler(args)
    except ModuleNotFoundError as exc:
        if not exc.name or exc.name.split(".")[0] == "privsep":
            raise
        print(
            f"runner: this command needs {exc.name}, which is not installed: "
            "pip install 'privsep[all]'",
            file=sys.stderr,
        )
        return 1
    except ConfigError as exc:
        print(f"runner: configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except CommandError as exc:
        print(f"runner: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        print("runner: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 1
