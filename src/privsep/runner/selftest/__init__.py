"""``runner selftest``: the attack battery, run in real sandboxes on the operator's host."""
