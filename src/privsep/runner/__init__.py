"""The trusted supervisor side: the ``runner`` CLI, configuration, permission checks."""
