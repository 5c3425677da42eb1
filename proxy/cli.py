"""Command line: `pgmux serve | demo | check-config | version`; setting flags go to pydantic-settings."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from proxy import BUILD, __version__
from proxy.logs import get_logger, label_worker, setup_logging
from proxy.settings import Settings, load_settings

log = get_logger("cli")

_EPILOG = """\
Any setting can be given as a flag (--default-pool-size 10, --upstream-url postgresql://...),
as a PGMUX_* environment variable (PGMUX_DEFAULT_POOL_SIZE=10) or in the TOML file;
flags win over the environment, which wins over the file. `pgmux check-config --help` lists them all.
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pgmux", description="A PostgreSQL connection pooler.",
                                     epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in [
        ("serve", "run the pooler against the configured upstream(s)"),
        ("demo", "start an embedded PostgreSQL and pgmux in front of it; print the URLs"),
        ("check-config", "validate the configuration and print it with secrets redacted"),
        ("version", "print the version"),
    ]:
        command = sub.add_parser(name, help=text, description=text, add_help=False)
        command.add_argument("--config", type=Path, default=None, help="TOML file (default: ./pgmux.toml if present)")
    return parser


def load_or_exit(config: Path | None, setting_flags: list[str], **overrides: object) -> Settings:
    try:
        return load_settings(config, setting_flags, **overrides)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'config'}: {e['msg']}" for e in exc.errors())
        print(f"pgmux: invalid configuration: {problems}", file=sys.stderr)
    except (FileNotFoundError, ValueError) as exc:
        print(f"pgmux: invalid configuration: {exc}", file=sys.stderr)
    raise SystemExit(2)


def main(argv: list[str] | None = None) -> None:
    args, setting_flags = _parser().parse_known_args(argv)
    if args.command == "version":
        print(f"pgmux {__version__}, {BUILD.describe()}")
        return
    if args.command == "demo":
        from proxy.demo import embedded_demo

        with embedded_demo() as demo:
            settings = demo.settings(load_or_exit(None, setting_flags, upstream_url=demo.upstream_url))
            setup_logging(settings.log_format, settings.log_level)
            serve(settings, on_ready=demo.announce)
        return
    settings = load_or_exit(args.config, setting_flags)
    if args.command == "check-config":
        print(json.dumps(settings.redacted(), indent=2))
        return
    setup_logging(settings.log_format, settings.log_level)
    serve(settings, lambda: load_settings(args.config, setting_flags))


def serve(settings: Settings, reload_settings: Callable[[], Settings] | None = None,
          on_ready: Callable[[Any], None] | None = None) -> None:
    from proxy.app import run

    workers = settings.worker_count()
    if workers == 1:
        run_until_stopped(run(settings, on_ready=on_ready, reload_settings=reload_settings))
        return
    serve_workers(settings, workers, reload_settings, on_ready)


def serve_workers(settings: Settings, workers: int, reload_settings: Callable[[], Settings] | None,
                  on_ready: Callable[[Any], None] | None) -> None:
    """Serve with ``workers`` processes sharing the backend limits (proxy/slots.py), each by its share of the
    others (proxy/workers.py)."""
    from proxy.app import run
    from proxy.peering import WorkerRole
    from proxy.slots import SlotTable, WorkerLedger
    from proxy.workers import (
        Supervisor,
        WorkerViews,
        private_cancel_addresses,
        report_metrics_port,
        reserve_listeners,
        worker_settings,
    )

    with contextlib.ExitStack() as held:  # what the supervisor holds for its workers, released when it is done
        try:
            settings, reserved = reserve_listeners(settings)
            for sock in reserved:
                held.callback(sock.close)
            # Decided before any worker forks: a replacement worker takes the address of the one it replaces.
            cancel_addresses = held.enter_context(private_cancel_addresses(workers))
        except OSError as exc:
            print(f"pgmux: cannot start {workers} workers: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
        listeners = settings.listeners  # the concrete addresses: a reload keeps them (listeners need a restart)
        slots = SlotTable(workers)  # every worker's backends under each limit (proxy/slots.py)
        held.callback(slots.close)
        supervisor = os.getpid()  # a console's SHUTDOWN asks it to stop every worker

        def run_worker(index: int, report: int | None) -> None:
            label_worker(index)

            def reload_share() -> Settings:
                assert reload_settings is not None
                reloaded = reload_settings().model_copy(update={"listen": None, "listeners": listeners})
                return worker_settings(reloaded, workers, index)

            def ready(proxy: Any) -> None:
                if report is not None and proxy.metrics is not None and proxy.metrics.address is not None:
                    report_metrics_port(report, proxy.metrics.address[1])
                if on_ready is not None and index == 0:
                    on_ready(proxy)

            role = WorkerRole(index, workers, cancel_addresses[index], cancel_addresses, supervisor)
            run_until_stopped(run(worker_settings(settings, workers, index), on_ready=ready,
                                  reload_settings=reload_share if reload_settings is not None else None, worker=role,
                                  ledger=WorkerLedger(slots, index)))

        log.info("pgmux %s: %d workers", __version__, workers)
        views = WorkerViews(workers) if settings.metrics_listen else None
        if views is not None and settings.metrics_listen is not None:
            held.callback(views.close)
            views.start(settings.metrics_listen)
        status = Supervisor(workers, run_worker, views, slots).run()
    raise SystemExit(status)


def run_until_stopped(main: Coroutine[Any, Any, None]) -> None:
    """Run pgmux's main coroutine on its event loop until it returns or Ctrl-C."""
    try:
        with asyncio.Runner(loop_factory=new_event_loop) as runner:
            runner.run(main)
    except KeyboardInterrupt:
        pass


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's loop when installed (the fastest for pgmux's socket I/O), else asyncio's."""
    try:
        import uvloop
    except ImportError:
        log.info("uvloop is not installed; using the standard asyncio loop")
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()
