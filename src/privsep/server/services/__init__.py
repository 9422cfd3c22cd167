"""The server's operations, each written once, for the FastAPI routes and the fast path."""
