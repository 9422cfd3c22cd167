"""Where the server is, and what it is called: the URLs to try and the token audience.

Apart from the URLs because replicas made them two things. A client may reach the service at
several addresses (each replica, or one load balancer), but every token it signs names the
service once, in ``aud``, and every replica checks that one value. The server, the supervisor,
the operator commands and ``runner standalone`` all read both here, so they cannot disagree
about the defaults.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from privsep.runner.config.loader import ConfigError

if TYPE_CHECKING:
    from privsep.runner.config.loader import Config


@dataclass(frozen=True)
class Endpoints:
    """``urls``: where to send requests, in the order to try them (at least one).
    ``audience``: the ``aud`` of every assertion, whichever URL it is sent to."""

    urls: tuple[str, ...]
    audience: str


def split_urls(value: str) -> tuple[str, ...]:
    """The URLs of a comma-separated list, in order, blanks and repeats dropped."""
    return tuple(dict.fromkeys(part.strip() for part in value.split(",") if part.strip()))


def endpoints(cfg: Config) -> Endpoints:
    """``server.urls`` (or ``server.url`` alone) and ``server.audience`` (or ``server.url``).

    The audience defaults to ``server.url`` exactly as written, as it always has, so a
    configuration from before replicas keeps working on both sides unchanged.
    """
    url = str(cfg.get("server.url"))
    urls = split_urls(str(cfg.get("server.urls"))) or (url,)
    audience = str(cfg.get("server.audience")) or url
    if not audience:
        raise ConfigError("server.audience: empty, and server.url is empty too")
    return Endpoints(urls, audience)


__all__ = ["Endpoints", "endpoints", "split_urls"]
