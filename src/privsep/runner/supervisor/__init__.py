"""The supervisor daemon: its work loop, launching, outcomes, and the credential socket."""
