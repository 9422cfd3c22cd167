"""Configuration: the option table, the loader, and ``check-perms``."""
