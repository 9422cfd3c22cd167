"""``runner token-refresher`` in Kerberos mode: ``kinit`` from a keytab into a shared cache.

As ``airflow kerberos`` does: the refresher alone reads the keytab, runs
``kinit -k -t KEYTAB -c CCACHE PRINCIPAL`` every ``token_refresher.interval`` seconds, and the
workers read the ticket cache only. Each run writes a new cache under a temporary name in the
cache's directory, which is then published like the session token file (flushed, mode 0640,
the supervisor's group, renamed over the old one), so a reader never sees a cache that
``kinit`` has only half written, and a failed ``kinit`` leaves the last good ticket in place.
A failed run is retried with the supervisor's backoff (1 s doubling to 5 min), one log line
each: ``kinit``'s own last line of complaint, which names no key.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import tempfile
from typing import TYPE_CHECKING

from privsep.runner.api.session import backoff_delays
from privsep.runner.api.token_file import make_token_dir, publish
from privsep.runner.errors import CommandError
from privsep.secrets.files import InsecureFileError, check_secret_file

if TYPE_CHECKING:
    from privsep.runner.supervisor.loopwake import StopOnTerm
    from privsep.runner.supervisor.refresher import RefresherSettings
    from privsep.runner.supervisor.systemd import Notifier

log = logging.getLogger("privsep.token_refresher")

# One kinit talks to one KDC; it has its own retries across the realm's KDCs within this.
KINIT_TIMEOUT = 60.0


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise CommandError(f"{name} is not installed (Debian: apt-get install krb5-user)")
    return path


def kinit_once(settings: RefresherSettings) -> str:
    """One ``kinit`` into a fresh cache, published over ``settings.ccache``. Returns "" on
    success, else the reason in one line."""
    kinit = _tool("kinit")
    make_token_dir(settings.ccache, gid=settings.gid)
    directory = os.path.dirname(os.path.abspath(settings.ccache))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(settings.ccache)}.", dir=directory)
    os.close(fd)
    try:
        done = subprocess.run(
            [kinit, "-k", "-t", settings.keytab, "-c", f"FILE:{tmp}", settings.principal],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=KINIT_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired:
        os.unlink(tmp)
        return f"kinit did not finish in {KINIT_TIMEOUT:.0f} s"
    if done.returncode != 0:
        os.unlink(tmp)
        lines = [line for line in (done.stderr or done.stdout).splitlines() if line.strip()]
        return lines[-1].strip() if lines else f"kinit exited {done.returncode}"
    publish(tmp, settings.ccache, gid=settings.gid)
    return ""


def refresh_kerberos(
    settings: RefresherSettings, stop: StopOnTerm, notifier: Notifier | None
) -> int:
    """Keep a fresh ticket for ``settings.principal`` in ``settings.ccache`` until stopped."""
    try:
        findings = check_secret_file(settings.keytab)
    except FileNotFoundError:
        raise CommandError(f"no keytab at {settings.keytab} (token_refresher.keytab)") from None
    except OSError as exc:
        raise CommandError(f"cannot read the keytab {settings.keytab}: {exc.strerror}") from None
    if findings:
        raise CommandError(f"refusing to use the keytab: {InsecureFileError(findings)}")
    delays = backoff_delays()
    ready = False
    while not stop.is_set():
        try:
            why = kinit_once(settings)
        except OSError as exc:
            raise CommandError(
                f"cannot write the ticket cache {settings.ccache}: {exc.strerror or exc}"
            ) from None
        if why:
            delay = delays()
            log.warning(
                "kinit for %s failed (%s); retrying in %.1f s", settings.principal, why, delay
            )
            stop.wait(delay)
            continue
        delays = backoff_delays()
        log.info(
            "ticket for %s written to %s; next kinit in %.0f s",
            settings.principal,
            settings.ccache,
            settings.interval,
        )
        if notifier and not ready:
            notifier.ready(status=f"keeping {settings.ccache} fresh")
        ready = True
        stop.wait(settings.interval)
    return 0


def check_ccache(ccache: str) -> tuple[bool, str]:
    """``klist -s``: whether the cache holds a ticket that has not expired."""
    klist = _tool("klist")
    with contextlib.suppress(OSError):
        if not os.access(ccache, os.R_OK):
            return False, f"cannot read the ticket cache {ccache}"
    done = subprocess.run(
        [klist, "-s", "-c", f"FILE:{ccache}"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        check=False,
        timeout=30,
    )
    if done.returncode != 0:
        return False, f"no valid ticket in {ccache} (klist -s failed)"
    return True, f"ok: {ccache} holds a valid ticket"
