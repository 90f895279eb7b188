"""The process: actors and the HTTP server in one root nursery, and a shutdown that loses nothing.

```
trio.run(main)
└── outer nursery: actors (started with nursery.start, so "ready" is known)
    └── inner nursery: signal watcher, HttpServer.serve(shutdown_trigger=…)
on SIGTERM/SIGINT: stop accepting, drain in-flight requests (bounded grace), then stop the
actors one by one in reverse start order (the ledger last: it drains, fsyncs, checkpoints).
A second signal exits at once with status 130.
```
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import trio

from sbactor.app import create_app
from sbactor.config import Config
from sbactor.edge import Edge, early_admission
from sbactor.gateway import Gateway
from sbactor.http_server import HttpServer, ServerLimits, display_address, open_listen_socket
from sbactor.ledger.verify import LedgerCorrupt

log = logging.getLogger("sbactor.server")


class StartupError(Exception):
    """The gateway cannot start; the message is one line for the operator."""


def http_server(config: Config, app: Edge) -> HttpServer:
    server = config.server
    limits = ServerLimits(
        max_connections=server.max_connections,
        max_body_bytes=server.max_body_bytes,
        keep_alive_s=server.keep_alive_s,
        request_read_s=server.request_read_s,
        write_timeout_s=server.write_timeout_s,
        max_header_bytes=server.max_header_bytes,
        # upstream pools at their fullest, plus the ledger, logs, listeners and Redis
        reserved_fds=256 + sum(getattr(p, "max_connections", 0) for p in config.providers),
    )
    return HttpServer(app, limits, access_log=server.access_log)


async def watch_signals(shutdown: trio.Event, gateway: Gateway) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            if not shutdown.is_set():
                log.warning(
                    "shutdown requested",
                    extra={"signal": signal.Signals(signum).name, "in_flight": gateway.in_flight},
                )
                gateway.draining = True
                shutdown.set()
            else:
                log.error("second signal: exiting without draining")
                os._exit(130)


async def run_gateway(
    config: Config,
    data_dir: Path,
    bind: str,
    *,
    announce: Callable[[str], None] | None = None,
    shutdown: trio.Event | None = None,
    ledger_recover: Literal["refuse", "quarantine"] = "refuse",
    task_status: trio.TaskStatus[tuple[Gateway, str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run until ``shutdown`` is set (or SIGTERM/SIGINT), then drain and stop the actors."""
    prepare_data_dir(data_dir)
    sock = open_socket(bind, config)
    gateway = Gateway.build(config, data_dir, ledger_recover=ledger_recover)
    server = http_server(config, Edge(gateway, create_app(gateway)))  # type: ignore[arg-type]
    server.admission = early_admission(gateway)
    gateway.http_server = server
    shutdown = shutdown if shutdown is not None else trio.Event()
    http_done = trio.Event()

    async def serve_http(task_status: trio.TaskStatus[None]) -> None:
        listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
        try:
            await server.serve(
                [listener],
                shutdown_trigger=shutdown.wait,
                grace_s=config.server.shutdown_grace_s,
                task_status=task_status,
            )
        finally:
            http_done.set()

    try:
        async with trio.open_nursery() as root:
            root.start_soon(watch_signals, shutdown, gateway)
            try:
                async with trio.open_nursery() as actors:
                    await gateway.start(actors)
                    try:
                        await actors.start(serve_http)
                        address = display_address(sock)
                        gateway.bound = address
                        gateway.ready = True
                        if announce is not None:
                            announce(address)
                        task_status.started((gateway, address))
                        await http_done.wait()  # returns after shutdown and the drain
                    finally:
                        gateway.draining = True
                        with trio.move_on_after(60, shield=True):
                            await gateway.stop()
            finally:
                root.cancel_scope.cancel()
    finally:
        with trio.move_on_after(5, shield=True):
            await gateway.aclose()


def open_socket(bind: str, config: Config) -> socket.socket:
    """Bind before anything starts, so a busy port is one clear line, not a traceback."""
    try:
        return open_listen_socket(
            bind, backlog=config.server.backlog, reuse_port=config.server.workers > 1
        )
    except OSError as exc:
        raise StartupError(_bind_error(bind, exc)) from None


def _bind_error(bind: str, exc: OSError) -> str:
    if exc.errno == errno.EADDRINUSE:
        return f"cannot bind {bind}: address already in use"
    if exc.errno == errno.EACCES:
        return f"cannot bind {bind}: permission denied"
    return f"cannot bind {bind}: {exc.strerror or exc}"


def prepare_data_dir(data_dir: Path) -> None:
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        probe = data_dir / ".write-probe"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise StartupError(f"data dir {data_dir} is not usable: {exc.strerror or exc}") from None


def serve_forever(
    config: Config,
    data_dir: Path,
    bind: str,
    *,
    on_ready: Callable[[str], None] | None = None,
    ledger_recover: Literal["refuse", "quarantine"] = "refuse",
) -> int:
    """Entry point for ``sbactor serve``: returns the process exit code."""

    def announce(address: str) -> None:
        print(f"sbactor listening on http://{address}", flush=True)
        if on_ready is not None:
            on_ready(address)

    try:
        trio.run(
            lambda: run_gateway(
                config, data_dir, bind, announce=announce, ledger_recover=ledger_recover
            )
        )
    except (StartupError, LedgerCorrupt) as exc:
        print(f"sbactor: {exc}", file=sys.stderr, flush=True)
        return 2
    except BaseExceptionGroup as group:
        startup, rest = group.split((StartupError, LedgerCorrupt))
        if startup is not None:
            print(f"sbactor: {_first(startup)}", file=sys.stderr, flush=True)
            return 2
        if rest is not None:
            log.critical("gateway failed", exc_info=rest)
            print(f"sbactor: gateway failed: {_first(rest)}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


def _first(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc
