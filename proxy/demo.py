"""`pgmux demo`: an embedded PostgreSQL with pgmux in front of it, for trying pgmux with nothing installed."""

from __future__ import annotations

import secrets

from proxy.cli import load_or_exit
from proxy.logs import get_logger, setup_logging

log = get_logger("demo")

DEMO_USER = "app"
DEMO_DATABASE = "app"


def run_demo(setting_flags: list[str]) -> None:
    from proxy.embedded import start_embedded_postgres

    password = secrets.token_urlsafe(12)
    print("pgmux demo: starting an embedded PostgreSQL ...", flush=True)
    with start_embedded_postgres() as postgres:
        postgres.psql(f"CREATE ROLE {DEMO_USER} LOGIN PASSWORD '{password}'; "
                      f"CREATE DATABASE {DEMO_DATABASE} OWNER {DEMO_USER};")
        direct_url = postgres.dsn(DEMO_USER, password, DEMO_DATABASE)
        settings = load_or_exit(None, setting_flags,
                                upstream_url=postgres.dsn(DEMO_USER, password, DEMO_DATABASE, sslmode="disable"))
        setup_logging(settings.log_format, settings.log_level)

        def announce(proxy: object) -> None:
            host, port = proxy.addresses[0]  # type: ignore[attr-defined]
            print(
                "\npgmux is ready. Point your app at the pooled URL; keep the direct one for migrations.\n\n"
                f"  DATABASE_URL=postgresql://{DEMO_USER}:{password}@{host}:{port}/{DEMO_DATABASE}\n"
                f"  DIRECT_URL={direct_url}\n\n"
                f"  try: psql \"postgresql://{DEMO_USER}:{password}@{host}:{port}/{DEMO_DATABASE}\"\n\n"
                f"PostgreSQL: pid {postgres.pid}, data directory {postgres.data_dir}\n"
                "Press Ctrl-C to stop pgmux and PostgreSQL (its data directory is removed).\n",
                flush=True,
            )

        from proxy.app import run
        from proxy.cli import run_until_stopped

        run_until_stopped(run(settings, on_ready=announce))
    print("pgmux demo: stopped pgmux and PostgreSQL.", flush=True)
