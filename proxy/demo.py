"""`pgmux demo`: an embedded PostgreSQL with pgmux in front of it, for trying pgmux with nothing installed."""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Iterator

from proxy.embedded import EmbeddedPostgres, start_embedded_postgres
from proxy.logs import get_logger
from proxy.settings import Settings

log = get_logger("demo")

DEMO_USER = "app"
DEMO_DATABASE = "app"


class Demo:
    """The demo's PostgreSQL, set up with a role and a database, and what the user is told about it."""

    def __init__(self, postgres: EmbeddedPostgres, password: str) -> None:
        self.postgres = postgres
        self.password = password
        self.upstream_url = postgres.dsn(DEMO_USER, password, DEMO_DATABASE, sslmode="disable")

    def settings(self, settings: Settings) -> Settings:
        """The demo's pgmux: in front of its PostgreSQL, with its user allowed on the admin console too."""
        admins = settings.admin_users if DEMO_USER in settings.admin_users else [*settings.admin_users, DEMO_USER]
        return settings.model_copy(update={"admin_users": admins})

    def announce(self, proxy: object) -> None:
        """Print the URLs once pgmux listens (``proxy``: the running app.Proxy)."""
        postgres, password = self.postgres, self.password
        direct_url = postgres.dsn(DEMO_USER, password, DEMO_DATABASE)
        host, port = proxy.addresses[0]  # type: ignore[attr-defined]
        print(
            "\npgmux is ready. Point your app at the pooled URL; keep the direct one for migrations.\n\n"
            f"  DATABASE_URL=postgresql://{DEMO_USER}:{password}@{host}:{port}/{DEMO_DATABASE}\n"
            f"  DIRECT_URL={direct_url}\n\n"
            f"  try: psql \"postgresql://{DEMO_USER}:{password}@{host}:{port}/{DEMO_DATABASE}\"\n"
            f"  admin console: psql \"postgresql://{DEMO_USER}:{password}@{host}:{port}/pgmux\" -c 'SHOW POOLS'\n\n"
            f"PostgreSQL: pid {postgres.pid}, data directory {postgres.data_dir}\n"
            "Press Ctrl-C to stop pgmux and PostgreSQL (its data directory is removed).\n",
            flush=True,
        )


@contextlib.contextmanager
def embedded_demo() -> Iterator[Demo]:
    """An embedded PostgreSQL with the demo's role and database while the block runs (cli.py serves pgmux in it)."""
    password = secrets.token_urlsafe(12)
    print("pgmux demo: starting an embedded PostgreSQL ...", flush=True)
    with start_embedded_postgres() as postgres:
        postgres.psql(f"CREATE ROLE {DEMO_USER} LOGIN PASSWORD '{password}'; "
                      f"CREATE DATABASE {DEMO_DATABASE} OWNER {DEMO_USER};")
        yield Demo(postgres, password)
    print("pgmux demo: stopped pgmux and PostgreSQL.", flush=True)
