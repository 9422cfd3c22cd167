"""Example workflows that ship with privsep; ``runner standalone`` runs them by default.

Each file here is a definition file like any user's: discovery finds it, a parse sandbox
imports it, and its tasks run in task sandboxes. (Files starting with ``_`` are skipped.)
"""
