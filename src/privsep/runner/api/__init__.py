"""The trusted side's HTTP client for the server: one keep-alive connection and one session."""
