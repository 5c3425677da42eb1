"""pgmux: a PostgreSQL connection pooler."""

from proxy.compiled import choose

__version__ = "0.1.0"
# Decided before any hot module is imported: compiled when built and current, else from source.
BUILD = choose()
