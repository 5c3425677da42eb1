"""The HTTP listener: WebSocket sessions (raw PostgreSQL bytes) and POST /sql, for edge runtimes."""
