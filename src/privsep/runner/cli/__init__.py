"""The ``runner`` command line: every command, ``standalone``, and the operator commands."""
