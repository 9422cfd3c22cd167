"""What the server needs to run, as plain values.

The server may not import the runner (where configuration is loaded), so ``runner server``
resolves the configuration and hands over this object. Secret values arrive here already read
through the permission-checked loaders and are never logged.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ServerSettings:
    database_url: str = field(repr=False)
    signing_keyring: str
    bind: str = "127.0.0.1:8780"
    socket_path: str = ""
    issuer: str = "privsep"
    audience: str = "http://127.0.0.1:8780"
    max_request_bytes: int = 1_048_576
    fernet_keys: tuple[str, ...] = field(default=(), repr=False)
    work_token_ttl: int = 600
    work_token_max_lifetime: int = 86_400
    session_token_ttl: int = 900
    signing_keys_refresh: float = 5.0
    assertion_max_ttl: int = 60
    supervisor_heartbeat_timeout: int = 120
    # Registered as operator ``operator_name`` on a start that finds no operator registered
    # (see privsep.server.admin.bootstrap_operator); never read once one is.
    operator_public_key: str = ""
    operator_name: str = "operator"
    workers: int = 1
    scheduler_interval: float = 5.0
    running_timeout_grace: float = 60.0
    max_running_per_workflow: int = 0  # 0: no limit
    max_running_total: int = 0  # 0: no limit
    # Central logs: kept this many days after their last write (0: forever), the oldest
    # dropped first once all of them pass the byte budget (0: no budget), and each item's
    # log cut (with a marker line) at the per-item cap.
    log_retention_days: float = 30.0
    log_retention_bytes: int = 10 * 1024**3
    log_max_item_bytes: int = 64 * 1024**2
    # Celery broker for wake-ups ("": publish none); may carry a password.
    wakeups_broker: str = field(default="", repr=False)
