"""``sbactor mock-upstream``: run the mock server until SIGINT/SIGTERM, then exit 0."""

from __future__ import annotations

import argparse
import signal
import sys
from typing import Any

import trio

from sbactor.upstream_mock.scenarios import Settings
from sbactor.upstream_mock.server import serve_mock


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``mock-upstream`` on an argparse subparsers object; sets ``func``."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "mock-upstream",
        help="run a fake OpenAI/Anthropic-compatible upstream for tests and benchmarks",
        description="A fake OpenAI- and Anthropic-compatible upstream. Requests pick scenarios "
        "with markers such as [mock:status=429] in the last user message (docs/mock-upstream.md).",
    )
    p.add_argument("--bind", default="127.0.0.1:9000", help="HOST:PORT (port 0 = any free port)")
    p.add_argument("--latency-ms", type=float, default=0.0, help="delay before each answer")
    p.add_argument("--fail-rate", type=float, default=0.0, help="fraction of requests that fail")
    p.add_argument("--fail-status", type=int, default=500, help="status of injected failures")
    p.add_argument("--refusal-rate", type=float, default=0.0, help="fraction answered by refusal")
    p.add_argument("--tokens-per-second", type=float, default=None, help="stream pacing")
    p.add_argument("--seed", type=int, default=None, help="seed for the failure/refusal rng")
    p.add_argument("--reply", default=None, help="fixed reply text instead of derived text")
    p.set_defaults(func=run)
    return p


def settings_from_args(args: argparse.Namespace) -> Settings:
    if not 0.0 <= args.fail_rate <= 1.0 or not 0.0 <= args.refusal_rate <= 1.0:
        raise ValueError("--fail-rate and --refusal-rate must be between 0 and 1")
    if not 400 <= args.fail_status <= 599:
        raise ValueError(f"--fail-status must be 400-599, got {args.fail_status}")
    if args.latency_ms < 0:
        raise ValueError("--latency-ms must be >= 0")
    if args.tokens_per_second is not None and args.tokens_per_second <= 0:
        raise ValueError("--tokens-per-second must be > 0")
    return Settings(latency_ms=args.latency_ms, fail_rate=args.fail_rate,
                    fail_status=args.fail_status, refusal_rate=args.refusal_rate, seed=args.seed,
                    tokens_per_second=args.tokens_per_second, reply=args.reply)


async def _main(bind: str, settings: Settings) -> None:
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        async def watch_signals() -> None:
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for _ in signals:
                    stop.set()
                    return

        nursery.start_soon(watch_signals)
        await nursery.start(lambda task_status: serve_mock(
            bind, settings, shutdown_trigger=stop.wait, task_status=task_status))
        await stop.wait()
        nursery.cancel_scope.deadline = trio.current_time() + 5  # bounded graceful stop


def run(args: argparse.Namespace) -> int:
    try:
        settings = settings_from_args(args)
    except ValueError as exc:
        print(f"sbactor mock-upstream: {exc}", file=sys.stderr)
        return 2
    failed: list[str] = []
    try:
        trio.run(_main, args.bind, settings)
    except* OSError as group:
        first = group.exceptions[0]
        failed.append(str(getattr(first, "strerror", None) or first))
    if failed:
        print(f"sbactor mock-upstream: cannot listen on {args.bind}: {failed[0]}",
              file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    """Standalone entry point (``python -m sbactor.upstream_mock.cli``)."""
    parser = argparse.ArgumentParser(prog="sbactor")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
