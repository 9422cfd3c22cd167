"""The errors both sandbox backends raise.

They live apart from either backend so that the container backend, the process backend and
their callers name one set of exceptions without one backend importing the other.
"""

from __future__ import annotations


class SandboxError(RuntimeError):
    """Base of the sandbox backends' errors."""


class SandboxUnavailable(SandboxError):
    """This host or user cannot run sandboxes; the message says why and what to change."""


class SandboxLaunchError(SandboxError):
    """One launch failed before a child existed (nothing is left running)."""
