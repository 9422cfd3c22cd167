"""Where the supervisor's session comes from: its own key, or a token refresher's file.

With ``supervisor.session_token_file`` set, ``runner token-refresher`` holds the key and the
supervisor reads only the short-lived session token it writes; the key is then never opened,
nor even its path resolved, in this process. Otherwise the supervisor reads its key, as it
always has, after the permission check has passed.
"""

from __future__ import annotations

from privsep.runner.api.credential import load_credential
from privsep.runner.api.session import SupervisorApi
from privsep.runner.api.token_file import SharedSession
from privsep.runner.errors import CommandError
from privsep.runner.supervisor.settings import SupervisorSettings


def supervisor_api(settings: SupervisorSettings) -> SupervisorApi:
    """The API client the supervisor calls the server with."""
    key = None
    shared = None
    if settings.session_token_file:
        shared = SharedSession(settings.session_token_file)
    else:
        path = settings.credential
        key = load_credential(
            path,
            role="supervisor",
            missing_hint=f"create it with `runner credentials create --out {path}`",
        )
    try:
        return SupervisorApi(
            settings.server_urls,
            settings.name,
            key,
            shared=shared,
            audience=settings.audience or None,
            unix_socket=settings.api_socket or None,
        )
    except ValueError as exc:
        raise CommandError(f"server.url or server.urls: {exc}") from None
