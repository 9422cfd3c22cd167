"""Fixtures shared by more than one module of this directory."""

from credsock_kit import harness, sockroot  # noqa: F401 - the credential-socket tests' fixtures
