"""Ledger throughput: entries/s through the LedgerWriter actor, unsigned vs signed, per fsync
mode and durability, plus the pure core (make_entry) and `verify` speed.

Bounded: every case stops after N entries or LIMIT_S seconds, whichever comes first.
Usage: python benchmarks/bench_ledger.py [--entries N] [--concurrency C]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

import _results
import trio

from sbactor.actors.ledger_writer import LedgerWriter
from sbactor.ledger.chain import GENESIS_HASH, SigningKey, make_entry, normalize_event, rfc3339
from sbactor.ledger.config import LedgerSinkConfig
from sbactor.ledger.verify import verify

LIMIT_S = 8.0
SEED = "42" * 32
EVENT: dict[str, Any] = {
    "kind": "chat", "model": "gpt-4o", "provider": "openai", "deployment": "openai/gpt-4o",
    "principal": {"user": "alice", "team": "research", "key_id": "k1"},
    "usage": {"prompt_tokens": 412, "completion_tokens": 128, "total_tokens": 540},
    "cost_usd": 0.00231, "latency_ms": 812.4, "status": 200, "attempts": 1, "stream": False,
}


def progress(label: str) -> None:
    print(f"[bench_ledger] {label} ...", file=sys.stderr, flush=True)


def bench_core(n: int, signed: bool) -> float:
    signer = SigningKey.from_seed_hex(SEED) if signed else None
    head, start = GENESIS_HASH, time.perf_counter()
    for seq in range(n):
        event = normalize_event(dict(EVENT, request_id=f"r{seq}"))
        entry, _ = make_entry(head, seq, rfc3339(time.time()), event, signer)
        head = entry.entry_hash
    return n / (time.perf_counter() - start)


async def _drive(w: LedgerWriter, n: int, concurrency: int) -> int:
    done = 0
    deadline = trio.current_time() + LIMIT_S

    async def client(c: int) -> None:
        nonlocal done
        for i in range(c, n, concurrency):
            if trio.current_time() > deadline:
                return
            await w.record(dict(EVENT, request_id=f"r{i}"))
            done += 1

    async with trio.open_nursery() as nursery:
        for c in range(concurrency):
            nursery.start_soon(client, c)
    return done


def bench_writer(n: int, concurrency: int, signed: bool,
                 fsync: Literal["always", "batch", "never"],
                 durability: Literal["strict", "batch"]) -> tuple[float, int]:
    with tempfile.TemporaryDirectory(dir=Path.cwd()) as tmp:
        cfg = LedgerSinkConfig(signing_seed_hex=SEED if signed else None, fsync=fsync,
                               durability=durability)
        w = LedgerWriter.from_config(cfg, Path(tmp))

        async def main() -> tuple[int, float]:
            async with trio.open_nursery() as nursery:
                await nursery.start(w.run)
                start = time.perf_counter()
                count = await _drive(w, n, concurrency)
                await w.stop()  # drained, fsynced, checkpointed: all counted entries are durable
                return count, time.perf_counter() - start

        count, elapsed = trio.run(main)
        assert verify(Path(tmp)).ok
        return count / elapsed, int(w.statistics().state["fsyncs"])


def bench_verify(n: int) -> tuple[float, float]:
    with tempfile.TemporaryDirectory(dir=Path.cwd()) as tmp:
        key = SigningKey.from_seed_hex(SEED)
        cfg = LedgerSinkConfig(signing_seed_hex=SEED, fsync="never")
        w = LedgerWriter.from_config(cfg, Path(tmp))

        async def main() -> None:
            async with trio.open_nursery() as nursery:
                await nursery.start(w.run)
                await _drive(w, n, 1)
                await w.stop()

        trio.run(main)
        entries = int(w.statistics().state["entries"])
        start = time.perf_counter()
        assert verify(Path(tmp)).ok
        chain_only = entries / (time.perf_counter() - start)
        start = time.perf_counter()
        assert verify(Path(tmp), public_key=key.public).ok
        return chain_only, entries / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--entries", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()
    n, c = args.entries, args.concurrency
    started = _results.start()
    rows: list[dict[str, Any]] = []
    for signed in (False, True):
        progress(f"core make_entry signed={signed}")
        rows.append({"case": f"core make_entry, {'signed' if signed else 'unsigned'}",
                     "entries_per_s": bench_core(n, signed), "fsyncs": None})
    cases: list[tuple[bool, Literal["always", "batch", "never"], Literal["strict", "batch"]]] = [
        (False, "never", "batch"), (True, "never", "batch"),
        (False, "batch", "batch"), (True, "batch", "batch"),
        (True, "batch", "strict"), (True, "always", "batch"), (True, "always", "strict"),
    ]
    for signed, fsync, durability in cases:
        progress(f"writer signed={signed} fsync={fsync} durability={durability}")
        n_case = n if fsync != "always" else min(n, 2000)
        rate, fsyncs = bench_writer(n_case, c, signed, fsync, durability)
        label = (f"writer {'signed' if signed else 'unsigned'}, fsync={fsync},"
                 f" durability={durability}")
        rows.append({"case": label, "entries_per_s": rate, "fsyncs": fsyncs})
    progress("verify")
    chain_only, with_sigs = bench_verify(n)
    rows.append({"case": "verify, chain only", "entries_per_s": chain_only, "fsyncs": None})
    rows.append({"case": "verify, chain + signatures", "entries_per_s": with_sigs, "fsyncs": None})
    width = max(len(r["case"]) for r in rows)
    print(f"ledger benchmark: {n} entries per case (fsync=always: <= 2000), concurrency {c},"
          f" cap {LIMIT_S:.0f} s per case")
    for r in rows:
        note = "" if r["fsyncs"] is None else f" ({r['fsyncs']} fsyncs)"
        print(f"  {r['case']:<{width}}  {r['entries_per_s']:,.0f} entries/s{note}")
    _results.write(__file__, args, rows, started, keys=["case"])


if __name__ == "__main__":
    main()
