"""A real, throwaway PostgreSQL cluster for tests: ``initdb`` + ``pg_ctl``, never a mock.

One cluster per test session (start-up costs about a second); each test gets its own database
with ``CREATE DATABASE``, which is cheap. The cluster:

* runs as an unprivileged user: PostgreSQL refuses to run as root, and a test suite should not
  need it to. Under root it runs as the ``postgres`` system user through ``runuser``;
  otherwise as the current user;
* lives in a fresh directory directly under ``/tmp`` (pytest's ``tmp_path`` sits below a 0700
  directory of root's that the ``postgres`` user cannot traverse); the directory records the
  owning pid, and a later session stops and removes clusters whose owner died;
* listens on 127.0.0.1 only, on a free port, with its unix socket inside that directory;
* requires a password over TCP (scram-sha-256), so the URLs under test carry a password just as
  production URLs do;
* runs with ``fsync=off``: durability is worthless for a cluster deleted at the end.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

SUPERUSER = "privsep_test"
DEFAULT_RUN_AS = "postgres"
START_TIMEOUT_S = 60
ROOT_PREFIX = "privsep-pg-"
OWNER_FILE = "owner.pid"
COMMAND_TIMEOUT_S = 120


class PostgresUnavailable(RuntimeError):
    """``initdb``/``pg_ctl`` are missing, or there is no unprivileged user to run them as."""


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def reap_orphans(pg_ctl: str, as_user: str | None) -> None:
    """Stop and delete clusters whose test session died without cleaning up (say, a crash).

    Each cluster directory records its owner's pid; only clusters whose owner is gone are
    touched, so concurrent test sessions of other people keep theirs.
    """
    for root in Path("/tmp").glob(f"{ROOT_PREFIX}*"):
        try:
            owner = int((root / OWNER_FILE).read_text())
        except (OSError, ValueError):
            continue
        if _process_exists(owner):
            continue
        data = root / "data"
        if (data / "postmaster.pid").exists():
            command = [pg_ctl, "-D", str(data), "-m", "immediate", "stop"]
            if as_user is not None:
                command = ["runuser", "-u", as_user, "--", *command]
            subprocess.run(
                command, cwd=root, capture_output=True, timeout=COMMAND_TIMEOUT_S, check=False
            )
        shutil.rmtree(root, ignore_errors=True)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PostgresCluster:
    """A private PostgreSQL cluster; use as a context manager, or call start() and stop()."""

    def __init__(self, run_as: str = DEFAULT_RUN_AS) -> None:
        self.initdb = shutil.which("initdb")
        self.pg_ctl = shutil.which("pg_ctl")
        if not self.initdb or not self.pg_ctl:
            raise PostgresUnavailable("initdb and pg_ctl must be on PATH")
        self.as_root = os.geteuid() == 0
        if self.as_root:
            try:
                self.user: pwd.struct_passwd | None = pwd.getpwnam(run_as)
            except KeyError:
                raise PostgresUnavailable(f"no {run_as!r} user to run PostgreSQL as") from None
            if shutil.which("runuser") is None:
                raise PostgresUnavailable("runuser is needed to start PostgreSQL as non-root")
        else:
            self.user = None
        self.password = secrets.token_urlsafe(16)
        self.port = 0
        self.root: Path | None = None
        self._started = False

    @property
    def data_dir(self) -> Path:
        assert self.root is not None
        return self.root / "data"

    def url(self, database: str = "postgres") -> str:
        """The ``postgresql+psycopg://`` URL of ``database``, password included."""
        return f"postgresql+psycopg://{SUPERUSER}:{self.password}@127.0.0.1:{self.port}/{database}"

    def _run(self, args: Sequence[str]) -> subprocess.CompletedProcess[str]:
        command = list(args)
        if self.as_root:
            assert self.user is not None
            command = ["runuser", "-u", self.user.pw_name, "--", *command]
        result = subprocess.run(
            command,
            cwd=self.root,  # the postgres user may not be able to enter ours
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT_S,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout}{result.stderr}"
            )
        return result

    def _chown(self, path: Path) -> None:
        if self.user is not None:
            os.chown(path, self.user.pw_uid, self.user.pw_gid)

    def start(self) -> None:
        """initdb, configure, start; retries on another port if the chosen one was taken."""
        assert self.initdb is not None and self.pg_ctl is not None
        reap_orphans(self.pg_ctl, self.user.pw_name if self.user is not None else None)
        self.root = Path(tempfile.mkdtemp(prefix=ROOT_PREFIX, dir="/tmp"))
        os.chmod(self.root, 0o700)
        (self.root / OWNER_FILE).write_text(str(os.getpid()))
        self._chown(self.root)
        pwfile = self.root / "pwfile"
        pwfile.write_text(self.password + "\n")
        os.chmod(pwfile, 0o600)
        self._chown(pwfile)
        self._run(
            [
                self.initdb,
                "-D",
                str(self.data_dir),
                "-U",
                SUPERUSER,
                f"--pwfile={pwfile}",
                "--auth-host=scram-sha-256",
                # The socket sits in the 0700 cluster directory: only its owner (and root)
                # can reach it, so trust there is no wider than the directory.
                "--auth-local=trust",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
            ]
        )
        pwfile.unlink()
        last_error: Exception | None = None
        for _ in range(5):
            self.port = free_port()
            settings = {
                "listen_addresses": "'127.0.0.1'",
                "port": str(self.port),
                "unix_socket_directories": f"'{self.root}'",
                "fsync": "off",
                "synchronous_commit": "off",
                "full_page_writes": "off",
                "max_connections": "200",
                "log_min_messages": "warning",
            }
            with (self.data_dir / "postgresql.auto.conf").open("w") as conf:
                conf.writelines(f"{key} = {value}\n" for key, value in settings.items())
            try:
                self._run(
                    [
                        self.pg_ctl,
                        "-D",
                        str(self.data_dir),
                        "-l",
                        str(self.root / "server.log"),
                        "-w",
                        "-t",
                        str(START_TIMEOUT_S),
                        "start",
                    ]
                )
            except RuntimeError as exc:  # most likely the port was taken meanwhile
                last_error = exc
                time.sleep(0.2)
                continue
            self._started = True
            return
        raise RuntimeError(f"PostgreSQL did not start: {last_error}\n{self.server_log()}")

    def crash(self) -> None:
        """Stop the server at once, as a crash or a failover would (``-m immediate``: every
        connection is cut), keeping the cluster for :meth:`restart`.

        This cluster commits with ``synchronous_commit = off``, so an immediate stop would
        also lose the last fraction of a second of commits, which a production server (where
        a commit is on disk before it is acknowledged) never does: a checkpoint first keeps
        every acknowledged commit, as there."""
        assert self.pg_ctl is not None and self._started
        with self._admin() as conn:
            conn.execute("CHECKPOINT")
        self._run([self.pg_ctl, "-D", str(self.data_dir), "-m", "immediate", "stop"])
        self._started = False

    def restart(self) -> None:
        """Start the server again after :meth:`crash`, on the same port with the same data."""
        assert self.pg_ctl is not None and not self._started
        self._run(
            [
                self.pg_ctl,
                "-D",
                str(self.data_dir),
                "-l",
                str(self.root / "server.log") if self.root else "server.log",
                "-w",
                "-t",
                str(START_TIMEOUT_S),
                "start",
            ]
        )
        self._started = True

    def server_log(self) -> str:
        """The server log, for failure messages."""
        log = None if self.root is None else self.root / "server.log"
        return log.read_text(errors="replace") if log is not None and log.exists() else ""

    def stop(self) -> None:
        """Stop immediately (nothing to flush) and delete the directory."""
        try:
            if self._started and self.pg_ctl is not None:
                self._run([self.pg_ctl, "-D", str(self.data_dir), "-m", "immediate", "stop"])
        finally:
            self._started = False
            if self.root is not None:
                shutil.rmtree(self.root, ignore_errors=True)
                self.root = None

    def _admin(self) -> psycopg.Connection[tuple[object, ...]]:
        return psycopg.connect(
            host="127.0.0.1",
            port=self.port,
            user=SUPERUSER,
            password=self.password,
            dbname="postgres",
            autocommit=True,
        )

    def create_database(self, name: str | None = None, template: str | None = None) -> str:
        """Create a database (optionally a copy of ``template``); returns its name."""
        name = name or f"t_{secrets.token_hex(6)}"
        statement = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
        if template is not None:
            statement += sql.SQL(" TEMPLATE {}").format(sql.Identifier(template))
        with self._admin() as conn:
            conn.execute(statement)
        return name

    def drop_database(self, name: str) -> None:
        """Drop a database, disconnecting whoever still uses it."""
        with self._admin() as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )

    def __enter__(self) -> PostgresCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()


@contextlib.contextmanager
def own_cluster() -> Iterator[PostgresCluster]:
    """A fresh cluster for as long as the block runs. Where PostgreSQL cannot run the test is
    skipped, except under ``PRIVSEP_REQUIRE_POSTGRES=1`` (CI), where that is an error."""
    try:
        cluster = PostgresCluster()
    except PostgresUnavailable as exc:
        if os.environ.get("PRIVSEP_REQUIRE_POSTGRES") == "1":
            raise
        pytest.skip(f"PostgreSQL not available: {exc}")
    with cluster:
        yield cluster
