"""Tests of the internal API server."""
