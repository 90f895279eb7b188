"""``sbactor ledger verify|keygen`` (also reachable as ``sbactor ai ledger ...``).

Exit codes of verify: 0 valid, 1 broken or forged (first broken seq and why), 2 operational
error (unreadable path, malformed key). Errors are one line, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import attrs

from sbactor.ledger.chain import PublicKey, SigningKey
from sbactor.ledger.verify import (
    LedgerOperationalError,
    Progress,
    VerifyReport,
    chain_dirs,
    verify,
)

EXIT_OK, EXIT_BROKEN, EXIT_ERROR = 0, 1, 2


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``ledger`` (with ``verify`` and ``keygen``) on an argparse subparsers action."""
    ledger = subparsers.add_parser("ledger", help="verify or manage the usage ledger")
    commands = ledger.add_subparsers(dest="ledger_command", metavar="{verify,keygen}")
    commands.required = True

    check = commands.add_parser("verify", help="verify a ledger file or directory")
    check.add_argument("path", help="a ledger directory (all segments) or one segment file")
    keys = check.add_mutually_exclusive_group()
    keys.add_argument("--public-key-hex", metavar="H", help="Ed25519 public key (64 hex chars)")
    keys.add_argument("--signing-seed-hex", metavar="H",
                      help="the signing seed instead of the public key (convenience)")
    check.add_argument("--checkpoints", metavar="F",
                       help="checkpoint file (default: checkpoints.jsonl beside the ledger)")
    check.add_argument("--format", choices=("text", "json"), default="text")
    check.add_argument("--no-progress", action="store_true", help="never show progress")
    check.set_defaults(func=run_verify)

    keygen = commands.add_parser("keygen", help="print a new signing seed and its public key")
    keygen.add_argument("--format", choices=("text", "json"), default="text")
    keygen.set_defaults(func=run_keygen)
    return ledger


def _error(message: str) -> int:
    print(f"sbactor ledger: error: {message}", file=sys.stderr)
    return EXIT_ERROR


def _progress_printer() -> Progress:
    last = [0.0]

    def show(done: int, total: int, entries: int) -> None:
        now = time.monotonic()
        if now - last[0] < 0.2 and done < total:
            return
        last[0] = now
        percent = 100.0 * done / total if total else 100.0
        end = "\n" if done >= total else ""
        sys.stderr.write(f"\rverifying: {percent:5.1f}%  {entries} entries{end}")
        sys.stderr.flush()

    return show


def run_verify(args: argparse.Namespace) -> int:
    try:
        if args.public_key_hex:
            key: PublicKey | None = PublicKey.from_hex(args.public_key_hex)
        elif args.signing_seed_hex:
            key = SigningKey.from_seed_hex(args.signing_seed_hex).public
        else:
            key = None
    except ValueError as exc:
        return _error(str(exc))
    show = not args.no_progress and args.format == "text" and sys.stderr.isatty()
    chains = chain_dirs(args.path)
    if chains:
        return _verify_chains(args, chains, key)
    try:
        report = verify(args.path, public_key=key, checkpoints=args.checkpoints,
                        progress=_progress_printer() if show else None)
    except LedgerOperationalError as exc:
        return _error(str(exc))
    if args.format == "json":
        print(json.dumps(attrs.asdict(report), sort_keys=True))
    else:
        print(_text(report, key))
    return EXIT_OK if report.ok else EXIT_BROKEN


def _verify_chains(args: argparse.Namespace, chains: list[Any], key: PublicKey | None) -> int:
    """A directory of chains (one per writer, e.g. ``worker-0/``): verify each, report each."""
    if args.checkpoints:
        return _error("--checkpoints names one chain's file; with several chains each uses its own")
    try:
        reports = [verify(chain, public_key=key) for chain in chains]
    except LedgerOperationalError as exc:
        return _error(str(exc))
    ok = all(r.ok for r in reports)
    if args.format == "json":
        print(json.dumps({"path": args.path, "ok": ok,
                          "entries": sum(r.entries for r in reports),
                          "chains": [attrs.asdict(r) for r in reports]}, sort_keys=True))
    else:
        good = sum(r.ok for r in reports)
        print(f"{'OK' if ok else 'BROKEN'}: {args.path}: {len(reports)} chain(s), {good} valid,"
              f" {sum(r.entries for r in reports)} entries")
        for report in reports:
            print("\n".join("  " + line for line in _text(report, key).splitlines()))
    return EXIT_OK if ok else EXIT_BROKEN


def _text(report: VerifyReport, key: PublicKey | None) -> str:
    if not report.ok:
        where = f" at seq {report.broken_seq}" if report.broken_seq is not None else ""
        return f"BROKEN{where}: {report.reason} ({report.path}, {report.entries} valid entries)"
    lines = [f"OK: {report.path}: {report.entries} entries in {report.segments} segment(s),"
             f" head {report.head_hash[:16]}…"]
    if key is not None:
        lines.append(f"  signatures: {report.signatures_checked} checked (key {key.kid})")
    elif report.kid is not None:
        lines.append(f"  signatures: NOT checked (signed by {report.kid}; pass --public-key-hex)")
    else:
        lines.append("  signatures: none (unsigned ledger: only the hash chain was checked)")
    if report.checkpoint_checked:
        lines.append(f"  checkpoint: seq {report.checkpoint_seq} matches")
    else:
        lines.append("  checkpoint: none found (deleting entries from the end is not detectable)")
    return "\n".join(lines)


def run_keygen(args: argparse.Namespace) -> int:
    key = SigningKey.generate()
    if args.format == "json":
        print(json.dumps({"signing_seed_hex": key.seed_hex, "public_key_hex": key.public.hex,
                          "kid": key.kid}))
    else:
        print(f"signing_seed_hex: {key.seed_hex}")
        print(f"public_key_hex:   {key.public.hex}")
        print(f"kid:              {key.kid}")
        print("# keep the seed secret (config `signing_seed_hex` or ${LEDGER_SEED_HEX});"
              " give verifiers the public key", file=sys.stderr)
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sbactor")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
