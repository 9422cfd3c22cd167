"""``runner ui``: start the local status page (:mod:`privsep.runner.ui`) and print its URL."""

from __future__ import annotations

import argparse
import signal
import sys

from privsep.runner.cli.operator import _port as port_number
from privsep.runner.cli.output import emit_json
from privsep.runner.cli.parsers import action
from privsep.runner.errors import EXIT_OK


def cmd_ui(args: argparse.Namespace) -> int:
    from privsep.runner.cli.operator_client import OperatorClient
    from privsep.runner.config.loader import load_config
    from privsep.runner.ui.server import StatusPage, loopback

    host = loopback(args.bind)
    with OperatorClient.from_config(load_config(args.config)) as client:
        # Fail here, in one line, rather than on every page: no server, or a credential it
        # refuses, is something to fix before opening a browser.
        client.call("GET", "/v1/operator/runs", what="list runs", params={"limit": 1})
        page = StatusPage(client, host, args.port)
        if args.json:
            emit_json({"url": page.url})
        else:
            print(f"status page: {page.url}")
            print("the token in it works once, for one browser; Ctrl-C stops the page")
        sys.stdout.flush()
        # SIGTERM (kill, a service manager) stops the page as Ctrl-C does; SIGINT is claimed
        # too, because a shell starts background jobs with it ignored.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.default_int_handler)
        try:
            page.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            page.server_close()
    return EXIT_OK


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = action(
        sub,
        "ui",
        "a local, read-only status page in the browser (prints its URL)",
        cmd_ui,
        json=True,
    )
    p.add_argument(
        "--bind",
        default="127.0.0.1",
        metavar="ADDRESS",
        help="loopback address to listen on (default 127.0.0.1; ::1 works too)",
    )
    p.add_argument(
        "--port", type=port_number, default=0, metavar="PORT", help="port (default 0: any free)"
    )
