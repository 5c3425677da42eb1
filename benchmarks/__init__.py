"""pgmux benchmarks: direct PostgreSQL vs pgmux vs PgBouncer in one run (`python -m benchmarks`, see README.md)."""
