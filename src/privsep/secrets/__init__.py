"""Long-lived credentials: permission-checked loading, key files, token handling."""
