"""Every configuration option privsep knows, with its type, default and one-line description.

This table is the single source: the loader validates against it, ``runner config`` prints from
it, and the shipped ``default_config.toml`` is generated from it (a test keeps them equal).
Adding an option means adding one row here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from privsep import __version__

Kind = Literal["str", "int", "float", "bool"]


@dataclass(frozen=True)
class Option:
    """One ``[section] key``.

    ``secret`` values are masked everywhere and may also be given as ``KEY_cmd`` (the first
    line of a command's output) or ``KEY_file`` (a file that must pass the permission check).
    ``secret_path`` values name a file or directory that holds a secret: ``check-perms`` checks
    them, and they may also be given as ``KEY_cmd`` or, for a file, as ``systemd:NAME`` (the
    credential systemd delivered in ``$CREDENTIALS_DIRECTORY``). ``path`` values are resolved
    against ``PRIVSEP_HOME`` when relative. A ``pattern`` is for values with a shape rather than a
    fixed list of ``choices``; ``pattern_words`` says that shape in the error message. A
    ``many`` value is a list: a TOML array of strings, or one comma-separated string (the only
    form an environment variable has); the loader keeps it as that comma-separated string.
    """

    section: str
    key: str
    kind: Kind
    default: str | int | float | bool
    description: str
    secret: bool = False
    secret_path: bool = False
    path: bool = False
    choices: tuple[str, ...] = ()
    minimum: int | float | None = None
    directory: bool = False
    # A string the value must match as a whole (re.fullmatch), and how to say so to a person.
    pattern: str = ""
    pattern_words: str = ""
    many: bool = False

    @property
    def name(self) -> str:
        return f"{self.section}.{self.key}"

    @property
    def accepts_cmd(self) -> bool:
        return self.secret or self.secret_path

    @property
    def accepts_file(self) -> bool:
        return self.secret


OPTIONS: tuple[Option, ...] = (
    # [core]
    Option(
        "core",
        "state_dir",
        "str",
        "state",
        "Directory for attempt logs, pid records and sandbox work dirs (relative: under home).",
        path=True,
    ),
    Option(
        "core",
        "runtime_dir",
        "str",
        "run",
        "Directory for sockets: the API socket and per-sandbox credential sockets.",
        path=True,
    ),
    Option(
        "core",
        "workflows_dir",
        "str",
        "workflows",
        "Folder of workflow definition files that discovery scans.",
        path=True,
    ),
    Option(
        "core",
        "strict_permissions",
        "bool",
        True,
        "Refuse to start server or supervisor on a check-perms violation; false is for "
        "development only.",
    ),
    Option(
        "core",
        "command_timeout",
        "float",
        10.0,
        "Seconds a KEY_cmd command may run before it counts as failed.",
        minimum=0.1,
    ),
    # [database]
    Option(
        "database",
        "url",
        "str",
        "",
        "SQLAlchemy URL of the metadata database; empty means SQLite in state_dir.",
        secret=True,
    ),
    # [server]
    Option("server", "bind", "str", "127.0.0.1:8780", "TCP host:port the internal API listens on."),
    Option(
        "server",
        "socket",
        "str",
        "run/server/api.sock",
        "Unix socket the internal API also listens on (mode 0660 in a 0750 directory).",
        path=True,
    ),
    Option(
        "server",
        "url",
        "str",
        "http://127.0.0.1:8780",
        "Base URL supervisors and clients use to reach the internal API (one server, or one "
        "load balancer in front of several replicas); the default token audience.",
    ),
    Option(
        "server",
        "urls",
        "str",
        "",
        "Several base URLs of server replicas, tried in order: a supervisor or operator "
        "command moves to the next one when one does not answer (or answers 502, 503 or "
        "504); empty means server.url alone. Set server.audience with it.",
        many=True,
    ),
    Option(
        "server",
        "audience",
        "str",
        "",
        "The service's identity in every token's aud claim: the same on every replica, "
        "supervisor and operator host, whichever URL they use; empty means server.url.",
    ),
    Option(
        "server",
        "max_request_bytes",
        "int",
        1_048_576,
        "Largest request body the API accepts, in bytes.",
        minimum=1024,
    ),
    Option(
        "server",
        "signing_keyring",
        "str",
        "keys/signing",
        "Directory of Ed25519 token-signing keys; only the server reads it.",
        secret_path=True,
        path=True,
        directory=True,
    ),
    Option(
        "server",
        "fernet_key",
        "str",
        "",
        "Key that encrypts stored connections; prefer fernet_key_file or fernet_key_cmd.",
        secret=True,
    ),
    Option("server", "issuer", "str", "privsep", "The iss claim of every token this server signs."),
    Option(
        "server",
        "work_token_ttl",
        "int",
        600,
        "Seconds a task, parse or trigger token lives before it must be refreshed.",
        minimum=5,
    ),
    Option(
        "server",
        "work_token_max_lifetime",
        "int",
        86_400,
        "Seconds after a claim past which a work token is no longer refreshed.",
        minimum=5,
    ),
    Option(
        "server",
        "session_token_ttl",
        "int",
        900,
        "Seconds a supervisor or operator session token lives.",
        minimum=5,
    ),
    Option(
        "server",
        "signing_keys_refresh",
        "float",
        5.0,
        "Seconds a server trusts its loaded signing keys before re-reading them: the longest a "
        "retired key still verifies anywhere, and the longest before a rotated key signs.",
        minimum=0.1,
    ),
    Option(
        "server",
        "supervisor_heartbeat_timeout",
        "int",
        120,
        "Seconds without a heartbeat after which a supervisor counts as lost.",
        minimum=5,
    ),
    Option(
        "server",
        "scheduler_interval",
        "float",
        5.0,
        "Longest pause between scheduler passes (runs from schedules, timeouts).",
        minimum=0.05,
    ),
    Option(
        "server",
        "running_timeout_grace",
        "float",
        60.0,
        "Seconds past a task's own timeout before the server ends a silent attempt.",
        minimum=0,
    ),
    Option(
        "server",
        "max_running_per_workflow",
        "int",
        0,
        "Most attempts of one workflow running at once; 0 means no limit.",
        minimum=0,
    ),
    Option(
        "server",
        "max_running_total",
        "int",
        0,
        "Most attempts running at once across all workflows; 0 means no limit.",
        minimum=0,
    ),
    Option("server", "workers", "int", 1, "Number of pre-forked API worker processes.", minimum=1),
    Option(
        "server",
        "log_retention_days",
        "float",
        30.0,
        "Central logs (what supervisors ship) are deleted this many days after their last "
        "write, by the scheduler's pass; 0 keeps them forever.",
        minimum=0,
    ),
    Option(
        "server",
        "log_retention_bytes",
        "int",
        10 * 1024**3,
        "Byte budget of all central logs together: past it, the scheduler deletes the logs "
        "written to longest ago first; 0 means no budget.",
        minimum=0,
    ),
    Option(
        "server",
        "log_max_item_bytes",
        "int",
        64 * 1024**2,
        "Most bytes of one attempt's (parse job's, trigger batch's) central log; the rest is "
        "cut, with a marker line saying so.",
        minimum=4096,
    ),
    Option(
        "server",
        "operator_public_key",
        "str",
        "credentials/operator.key.pub",
        "Bootstrap operator key: registered as server.operator_name when the server starts "
        "and finds no operator registered (a new install, or an upgrade from a single "
        "configured key); ignored once any operator is registered (see runner operators).",
        path=True,
    ),
    Option(
        "server",
        "operator_name",
        "str",
        "operator",
        "Name the bootstrap operator key (server.operator_public_key) is registered under.",
    ),
    Option(
        "server",
        "wakeups_broker",
        "str",
        "",
        "Celery broker (redis://HOST:PORT/DB) the server publishes wake-ups to when work becomes "
        "claimable: queue names and item ids only, never a token or a payload. Empty: publish "
        "nothing (supervisors poll). Give a URL with a password as wakeups_broker_file or "
        "wakeups_broker_cmd.",
        secret=True,
    ),
    # [supervisor]
    Option(
        "supervisor",
        "name",
        "str",
        "",
        "Name this supervisor registers under; empty means the host name.",
    ),
    Option(
        "supervisor",
        "api_socket",
        "str",
        "",
        "Reach the internal API through this unix socket (the server's [server] socket) "
        "instead of over TCP, when both run on one host; empty means use server.url.",
    ),
    Option(
        "supervisor",
        "credential",
        "str",
        "credentials/supervisor.key",
        "Ed25519 private key (PEM) this supervisor proves its identity with; "
        "systemd:NAME reads the credential that the unit's LoadCredential=NAME:PATH "
        "delivers in $CREDENTIALS_DIRECTORY.",
        secret_path=True,
        path=True,
    ),
    Option(
        "supervisor",
        "session_token_file",
        "str",
        "",
        "Read the supervisor's session token from this file, which runner token-refresher "
        "keeps fresh, instead of holding supervisor.credential: the supervisor then never "
        "reads a key. Empty: the supervisor holds its own key.",
        path=True,
    ),
    Option(
        "supervisor",
        "executor",
        "str",
        "local",
        "How work items run: one at a time (sequential) or in parallel (local).",
        choices=("sequential", "local"),
    ),
    Option(
        "supervisor",
        "parallelism",
        "int",
        0,
        "How many items the local executor runs at once; 0 means one per CPU core.",
        minimum=0,
    ),
    Option(
        "supervisor",
        "heartbeat_interval",
        "float",
        5.0,
        "Seconds between heartbeats to the server.",
        minimum=0.1,
    ),
    Option(
        "supervisor",
        "metrics_bind",
        "str",
        "",
        "host:port of the supervisor's metrics listener (Prometheus text format at /metrics), "
        "on a loopback address only; empty turns it off. Anyone on this host can read it: "
        "counts and timings, no secret, no name of a workflow or attempt.",
        pattern=r"|(127\.\d{1,3}\.\d{1,3}\.\d{1,3}|localhost|\[::1\]):\d{1,5}",
        pattern_words="empty, or a loopback host:port such as 127.0.0.1:9781",
    ),
    Option(
        "supervisor",
        "drain_grace",
        "float",
        30.0,
        "On SIGTERM, seconds running work may take to finish before it is killed.",
        minimum=0,
    ),
    Option(
        "supervisor",
        "log_retention_days",
        "float",
        14.0,
        "Attempt logs older than this are deleted; 0 keeps them forever.",
        minimum=0,
    ),
    Option(
        "supervisor",
        "discovery",
        "bool",
        True,
        "Scan core.workflows_dir for definition files and queue parses of changed ones.",
    ),
    Option(
        "supervisor",
        "discovery_interval",
        "float",
        10.0,
        "Seconds between scans of the workflows folder. A scan reads a file again only when "
        "its size, times or inode changed.",
        minimum=0.1,
    ),
    Option(
        "supervisor",
        "discovery_sources",
        "str",
        "manifest,crawl",
        "Where discovery finds definition files, comma-separated: manifest (the files "
        "manifest.json in the workflows folder names), crawl (every *.py there) or "
        "module:function (called with the folder, returns paths). A failing source makes "
        "the scan report nothing, so nothing is deleted.",
    ),
    Option(
        "supervisor",
        "task_timeout",
        "float",
        3600.0,
        "Wall-clock limit of a task sandbox when the task sets none, in seconds.",
        minimum=1,
    ),
    Option(
        "supervisor",
        "parse_timeout",
        "float",
        30.0,
        "Wall-clock limit of a parse sandbox, in seconds.",
        minimum=1,
    ),
    Option(
        "supervisor",
        "trigger_timeout",
        "float",
        3600.0,
        "Wall-clock limit of a trigger sandbox, in seconds.",
        minimum=1,
    ),
    Option(
        "supervisor",
        "bundle_version",
        "str",
        "git",
        "The bundle version recorded with each parse: git (the commit checked out in the git "
        "work tree holding core.workflows_dir, read from its files; git is never run), none, "
        "or literal:TEXT to record TEXT, such as a release name.",
        # The server's ParseJobRequest.bundle_version takes at most 250 characters.
        pattern=r"git|none|literal:[^\x00-\x1f\x7f]{1,250}",
        pattern_words="git, none or literal:TEXT (TEXT: 1 to 250 characters, no control "
        "characters)",
    ),
    Option(
        "supervisor",
        "queues",
        "str",
        "default",
        "The work queues this supervisor serves: it claims only tasks whose workflow or task "
        "names one of them (a task without a queue is on default). Parse jobs and triggers go "
        "to any supervisor.",
        many=True,
        pattern=r"[A-Za-z0-9_.\-]{1,64}(\s*,\s*[A-Za-z0-9_.\-]{1,64})*",
        pattern_words="queue names (letters, digits, _ . -; at most 64 characters each)",
    ),
    Option(
        "supervisor",
        "poll_interval",
        "float",
        1.0,
        "Longest seconds between claims while no work is found. Polling: claims back off from "
        "20 ms to this. With wakeups = celery a wake-up claims at once and the claim waits "
        "this long otherwise, so it can be long (30 or more): it only bounds the delay of a "
        "lost wake-up.",
        minimum=0.05,
    ),
    Option(
        "supervisor",
        "wakeups",
        "str",
        "poll",
        "How the supervisor learns of new work: poll (claim every poll_interval at most) or "
        "celery (also consume wake-ups from wakeups_broker as a Celery worker, acks late, "
        "prefetch 1, and claim at once; the claim still goes through the API).",
        choices=("poll", "celery"),
    ),
    Option(
        "supervisor",
        "wakeups_broker",
        "str",
        "",
        "Celery broker the supervisor consumes wake-ups from (wakeups = celery): the server's "
        "server.wakeups_broker. Give a URL with a password as wakeups_broker_file or "
        "wakeups_broker_cmd.",
        secret=True,
    ),
    # [token_refresher]
    Option(
        "token_refresher",
        "mode",
        "str",
        "privsep",
        "What runner token-refresher keeps fresh: privsep (a supervisor session token bought "
        "with supervisor.credential) or kerberos (a ticket cache from a keytab, via kinit).",
        choices=("privsep", "kerberos"),
    ),
    Option(
        "token_refresher",
        "token_file",
        "str",
        "",
        "Privsep mode: where the session token is written (mode 0640); empty means "
        "supervisor.session_token_file.",
        path=True,
    ),
    Option(
        "token_refresher",
        "group",
        "str",
        "",
        "Group (name or number) that may read the token file or ticket cache: the "
        "supervisor's; empty means the refresher's own group.",
    ),
    Option("token_refresher", "principal", "str", "", "Kerberos mode: the principal to kinit."),
    Option(
        "token_refresher",
        "keytab",
        "str",
        "",
        "Kerberos mode: the keytab holding the principal's key (mode 0600, the refresher's).",
        path=True,
    ),
    Option(
        "token_refresher",
        "ccache",
        "str",
        "",
        "Kerberos mode: the ticket cache file that is written (mode 0640), shared like the token.",
        path=True,
    ),
    Option(
        "token_refresher",
        "interval",
        "float",
        3600.0,
        "Kerberos mode: seconds between two kinit runs (keep it under the ticket lifetime).",
        minimum=1,
    ),
    # [operator]
    Option(
        "operator",
        "credential",
        "str",
        "credentials/operator.key",
        "Ed25519 private key (PEM) for operator commands.",
        secret_path=True,
        path=True,
    ),
    # [sandbox]
    Option(
        "sandbox",
        "backend",
        "str",
        "process",
        "Sandbox backend: process (uid drop and namespaces) or container (Docker).",
        choices=("process", "container"),
    ),
    Option(
        "sandbox",
        "image",
        "str",
        f"privsep-sandbox:{__version__}",
        "Container backend: the sandbox image (packaging/container/build-image builds it).",
    ),
    Option(
        "sandbox",
        "launch_mode",
        "str",
        "template",
        "Process backend start: exec a fresh interpreter (spawn) or fork a warm template.",
        choices=("spawn", "template"),
    ),
    Option(
        "sandbox",
        "prewarm",
        "int",
        4,
        "Template mode: sandboxes kept half-built and waiting, so a launch skips setup.",
        minimum=0,
    ),
    Option(
        "sandbox",
        "uid_first",
        "int",
        100_000,
        "First uid (and gid) of the pool that sandboxes run as; never a real user's uid.",
        minimum=1000,
    ),
    Option(
        "sandbox",
        "uid_count",
        "int",
        1000,
        "Number of uids in the pool: the most sandboxes that can run at once.",
        minimum=1,
    ),
    Option(
        "sandbox",
        "network",
        "str",
        "none",
        "Default network policy for sandboxes: none (own empty namespace) or host.",
        choices=("none", "host"),
    ),
)

BY_NAME: dict[str, Option] = {o.name: o for o in OPTIONS}
SECTIONS: tuple[str, ...] = tuple(dict.fromkeys(o.section for o in OPTIONS))
