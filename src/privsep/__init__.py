"""privsep: run untrusted workflow code with no long-lived secret and no database access.

This top-level module stays empty on purpose: user code imports ``privsep.client`` inside a
sandbox, and that must not drag in anything trusted or heavy.
"""

__version__ = "0.1.0"
