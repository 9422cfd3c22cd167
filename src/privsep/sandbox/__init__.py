"""Sandbox backends: one spec in, one isolated child out. Knows nothing of secrets."""
