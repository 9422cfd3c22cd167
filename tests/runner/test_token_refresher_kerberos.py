"""``runner token-refresher`` in Kerberos mode against a real KDC.

The test makes its own realm in a temporary directory (MIT ``kdb5_util create -s``, a principal
with a random key, its keytab from ``kadmin.local ktadd``) and starts ``krb5kdc`` on a free
port, configured only through ``KRB5_CONFIG`` and ``KRB5_KDC_PROFILE``. The refresher runs as
its own uid, the keytab's owner, and keeps a ticket cache fresh for another group.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from other_uid import as_user
from stack import free_port

REALM = "PRIVSEP.TEST"
PRINCIPAL = f"refresher/node1@{REALM}"
REFRESHER_UID = 150_910
TOKEN_GID = 150_912


@dataclass
class Kdc:
    base: Path
    env: dict[str, str]
    keytab: Path


def _run(env: dict[str, str], *argv: str) -> None:
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, (argv, done.stdout, done.stderr)


@pytest.fixture(scope="module")
def kdc() -> Iterator[Kdc]:
    base = Path(tempfile.mkdtemp(prefix="krb-", dir="/tmp"))
    base.chmod(0o755)
    port = free_port()
    (base / "krb5.conf").write_text(
        f"[libdefaults]\n default_realm = {REALM}\n dns_lookup_kdc = false\n"
        f" dns_lookup_realm = false\n rdns = false\n ticket_lifetime = 10m\n"
        f"[realms]\n {REALM} = {{\n  kdc = 127.0.0.1:{port}\n }}\n"
    )
    (base / "kdc.conf").write_text(
        f"[kdcdefaults]\n kdc_ports = {port}\n kdc_tcp_ports = {port}\n"
        f"[realms]\n {REALM} = {{\n  database_name = {base}/principal\n"
        f"  key_stash_file = {base}/stash\n  acl_file = {base}/kadm5.acl\n }}\n"
        f"[logging]\n kdc = FILE:{base}/kdc.log\n"
    )
    (base / "kadm5.acl").write_text("")
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("KRB5", "PRIVSEP"))},
        "KRB5_CONFIG": str(base / "krb5.conf"),
        "KRB5_KDC_PROFILE": str(base / "kdc.conf"),
    }
    keytab = base / "keytab" / "refresher.keytab"
    keytab.parent.mkdir(mode=0o700)
    _run(env, "kdb5_util", "-r", REALM, "create", "-s", "-P", "master-password-for-tests")
    _run(env, "kadmin.local", "-r", REALM, "-q", f"addprinc -randkey {PRINCIPAL}")
    _run(env, "kadmin.local", "-r", REALM, "-q", f"ktadd -k {keytab} {PRINCIPAL}")
    os.chown(keytab.parent, REFRESHER_UID, REFRESHER_UID)
    os.chown(keytab, REFRESHER_UID, REFRESHER_UID)
    keytab.chmod(0o600)
    server = subprocess.Popen(
        ["krb5kdc", "-n", "-r", REALM], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 30
    while True:
        assert server.poll() is None, server.stderr.read() if server.stderr else ""
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        assert time.monotonic() < deadline, "krb5kdc did not listen"
        time.sleep(0.1)
    try:
        yield Kdc(base, env, keytab)
    finally:
        server.terminate()
        server.wait(timeout=10)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def shared(kdc: Kdc) -> Iterator[Path]:
    """A directory the refresher may create its cache directory in."""
    path = Path(tempfile.mkdtemp(prefix="shared-", dir=kdc.base))
    path.chmod(0o755)
    os.chown(path, REFRESHER_UID, REFRESHER_UID)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _refresher(kdc: Kdc, ccache: Path, principal: str = PRINCIPAL) -> subprocess.Popen[str]:
    home = ccache.parent.parent / "home"
    home.mkdir(exist_ok=True, mode=0o700)
    os.chown(home, REFRESHER_UID, REFRESHER_UID)
    env = {
        **kdc.env,
        "PRIVSEP_HOME": str(home),
        "PRIVSEP__TOKEN_REFRESHER__MODE": "kerberos",
        "PRIVSEP__TOKEN_REFRESHER__PRINCIPAL": principal,
        "PRIVSEP__TOKEN_REFRESHER__KEYTAB": str(kdc.keytab),
        "PRIVSEP__TOKEN_REFRESHER__CCACHE": str(ccache),
        "PRIVSEP__TOKEN_REFRESHER__GROUP": str(TOKEN_GID),
        "PRIVSEP__TOKEN_REFRESHER__INTERVAL": "2",
    }
    return subprocess.Popen(
        [sys.executable, "-m", "privsep", "token-refresher"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=as_user(REFRESHER_UID, REFRESHER_UID, [TOKEN_GID]),
        cwd="/",
    )


def _wait(
    predicate: Callable[[], bool], timeout: float, what: str, proc: subprocess.Popen[str]
) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(
                f"the refresher exited while waiting for {what}: "
                f"{proc.stdout.read() if proc.stdout else ''}"
            )
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_the_refresher_keeps_a_shared_ticket_cache_fresh(kdc: Kdc, shared: Path) -> None:
    ccache = shared / "cc" / "ccache"
    proc = _refresher(kdc, ccache)
    try:
        _wait(ccache.exists, 30, "the first ticket", proc)
        listed = subprocess.run(
            ["klist", "-c", f"FILE:{ccache}"],
            env=kdc.env,
            capture_output=True,
            text=True,
            check=False,
        )
        assert listed.returncode == 0, listed.stderr
        assert f"Default principal: {PRINCIPAL}" in listed.stdout
        st = ccache.stat()
        assert stat.S_IMODE(st.st_mode) == 0o640
        assert (st.st_uid, st.st_gid) == (REFRESHER_UID, TOKEN_GID)
        directory = ccache.parent.stat()  # made by the refresher for the group
        assert stat.S_IMODE(directory.st_mode) == 0o750 and directory.st_gid == TOKEN_GID
        # Renewed after an interval: a new file, renamed over the old one.
        first = (st.st_ino, st.st_mtime_ns)
        _wait(
            lambda: (ccache.stat().st_ino, ccache.stat().st_mtime_ns) != first,
            30,
            "a renewal",
            proc,
        )
        health = subprocess.run(
            [sys.executable, "-m", "privsep", "health", "--token-refresher"],
            env={
                **kdc.env,
                "PRIVSEP__TOKEN_REFRESHER__MODE": "kerberos",
                "PRIVSEP__TOKEN_REFRESHER__PRINCIPAL": PRINCIPAL,
                "PRIVSEP__TOKEN_REFRESHER__KEYTAB": str(kdc.keytab),
                "PRIVSEP__TOKEN_REFRESHER__CCACHE": str(ccache),
            },
            capture_output=True,
            text=True,
            check=False,
        )
        assert health.returncode == 0, health.stdout + health.stderr
        assert health.stdout.startswith(f"ok: {ccache} holds a valid ticket")
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=10)
    assert proc.returncode == 0, out
    assert "Traceback" not in out
    assert [p.name for p in ccache.parent.iterdir()] == ["ccache"]  # no temporary left behind


def test_a_failing_kinit_is_retried_with_one_line_each(kdc: Kdc, shared: Path) -> None:
    ccache = shared / "cc" / "ccache"
    proc = _refresher(kdc, ccache, principal=f"nobody@{REALM}")
    time.sleep(4)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=10)
    assert proc.returncode == 0, out
    lines = out.strip().splitlines()
    assert len(lines) >= 2, out
    assert all(
        f"kinit for nobody@{REALM} failed (" in line and "retrying in" in line for line in lines
    ), out
    assert not ccache.exists()
    assert [p.name for p in ccache.parent.iterdir()] == []  # the failed caches were removed
