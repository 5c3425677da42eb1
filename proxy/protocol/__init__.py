"""Sans-IO PostgreSQL wire protocol: parsers take bytes, builders return bytes; no sockets, no asyncio."""
