"""The ``sbactor`` command line. Exit codes: 0 ok, 1 a check failed, 2 an operational error."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from sbactor import __version__
from sbactor.config_load import ConfigError

DEMO_BANNER = """\
================================================================================
 sbactor demo: built-in config, in-process mock providers, every capability on.
 AUTH IS OFF: anyone who can reach {address} can use this gateway.
 Data (signed ledger, budgets, usage log) under: {data_dir}
 Try:
   curl -s http://{address}/v1/chat/completions -H 'content-type: application/json' \\
     -d '{{"model": "gpt-4o-mini", "messages": [{{"role": "user", "content": "Hello"}}]}}'
   sbactor ledger verify {data_dir}/ledger --public-key-hex {public_key}
================================================================================"""


def _load(path: str | None) -> Any:
    from sbactor.config import load_config, parse_config
    from sbactor.config_load import load_yaml_text

    if path is None:
        text = resources.files("sbactor").joinpath("demo.yaml").read_text(encoding="utf-8")
        return parse_config(load_yaml_text(text, "<demo config>"), source="<demo config>")
    return load_config(path)


def _print_problems(source: str, exc: ConfigError) -> None:
    print(f"sbactor: {source}: {len(exc.problems)} problem(s) in the config:", file=sys.stderr)
    for problem in exc.problems:
        print(f"  {problem}", file=sys.stderr)


def cmd_serve(args: argparse.Namespace) -> int:
    from sbactor.logs import configure_logging
    from sbactor.server import serve_forever

    try:
        config = _load(args.config)
    except ConfigError as exc:
        _print_problems(args.config or "<demo config>", exc)
        return 2
    configure_logging(config.server.log_level)
    bind = args.bind or config.server.bind
    data_dir = Path(args.data_dir)
    if args.workers is not None or args.worker_id is not None:
        import attrs

        from sbactor.config import cross_check

        workers = args.workers or config.server.workers
        config = attrs.evolve(config, server=attrs.evolve(config.server, workers=workers))
        problems = cross_check(config)
        if problems:
            _print_problems(args.config or "<demo config>", ConfigError(problems))
            return 2
    if args.worker_id is not None:
        from sbactor.workers import worker_config

        config = worker_config(config, args.worker_id)
    elif config.server.workers > 1:
        from sbactor.workers import serve_workers

        if args.config is None:
            print("sbactor: --workers needs --config", file=sys.stderr)
            return 2
        return serve_workers(config.server.workers, args.config, bind, data_dir,
                             ledger_recover=args.ledger_recover)
    if args.config is None:
        from nacl.signing import SigningKey

        from sbactor.ledger.config import LedgerSinkConfig

        public = "<public key>"
        for sink in config.usage_sinks:
            if isinstance(sink, LedgerSinkConfig) and sink.signing_seed_hex:
                seed = bytes.fromhex(sink.signing_seed_hex)
                public = SigningKey(seed).verify_key.encode().hex()

        def banner(address: str) -> None:
            text = DEMO_BANNER.format(address=address, data_dir=data_dir, public_key=public)
            print(text, file=sys.stderr, flush=True)

        return serve_forever(
            config, data_dir, bind, on_ready=banner, ledger_recover=args.ledger_recover
        )
    return serve_forever(config, data_dir, bind, ledger_recover=args.ledger_recover)


def cmd_config_check(args: argparse.Namespace) -> int:
    try:
        config = _load(args.file)
    except ConfigError as exc:
        _print_problems(args.file, exc)
        return 2
    print(
        f"{args.file}: ok ({len(config.providers)} providers, {len(config.models)} models, "
        f"{len(config.keys)} keys)"
    )
    return 0


def cmd_config_schema(args: argparse.Namespace) -> int:
    from sbactor.config import Config
    from sbactor.config_schema import json_schema

    print(json.dumps(json_schema(Config), indent=2))
    return 0


def cmd_keys_new(args: argparse.Namespace) -> int:
    from sbactor.auth import new_key

    key, digest = new_key()
    print(f"key:        {key}")
    print(f"key_sha256: {digest}")
    print("Give the key to the client; put only key_sha256 in the config's keys: list.")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from sbactor.ledger.cli import add_parser as add_ledger
    from sbactor.policy.cli import add_parser as add_policy
    from sbactor.upstream_mock.cli import add_parser as add_mock

    parser = argparse.ArgumentParser(prog="sbactor", description="An AI gateway on Trio.")
    parser.add_argument("--version", action="version", version=f"sbactor {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", help="YAML config (default: the built-in demo)")
    serve.add_argument("--bind", help="HOST:PORT to listen on (overrides server.bind)")
    serve.add_argument("--data-dir", default="sbactor-data", help="where state lives")
    serve.add_argument(
        "--ledger-recover", choices=("refuse", "quarantine"), default="refuse",
        help="a ledger broken in the middle: refuse to start (default), or move the broken"
        " part to quarantine-<time>/ and continue from the last good entry",
    )
    serve.add_argument("--workers", type=int, metavar="N",
                       help="worker processes on one port (> 1 needs state.backend redis)")
    serve.add_argument("--worker-id", type=int, help=argparse.SUPPRESS)
    serve.set_defaults(func=cmd_serve)

    config = sub.add_parser("config", help="check a config or print its JSON Schema")
    config_sub = config.add_subparsers(dest="config_command", required=True, metavar="COMMAND")
    check = config_sub.add_parser("check", help="validate a config file")
    check.add_argument("file")
    check.set_defaults(func=cmd_config_check)
    schema = config_sub.add_parser("schema", help="print the config's JSON Schema")
    schema.set_defaults(func=cmd_config_schema)

    keys = sub.add_parser("keys", help="virtual keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True, metavar="COMMAND")
    keys_sub.add_parser("new", help="print a new key and its SHA-256").set_defaults(
        func=cmd_keys_new
    )

    add_ledger(sub)
    ai = sub.add_parser("ai", help="aliases (sbactor ai ledger verify …)")
    add_ledger(ai.add_subparsers(dest="ai_command", required=True, metavar="COMMAND"))
    add_policy(sub)
    add_mock(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code = args.func(args)
    except KeyboardInterrupt:
        return 130
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
