"""The SDK that user code imports inside a sandbox.

It imports only the standard library and ``requests``: it must load in an environment that has
nothing else installed, and it must never pull in trusted code.
"""

from __future__ import annotations

__all__: list[str] = []
