"""The internal API server: the only component with database access and signing keys."""
