"""What the actor runtime costs: cast and call throughput on one actor.

One trivial actor (its handler adds a number), 1 or 32 sender tasks, each cell runs for
``--duration`` seconds. ``cast`` counts messages the actor has *processed* (senders cast in a loop
and wait for mailbox room: backpressure); ``call`` counts full request/reply round trips.
A ``baseline`` row calls the handler directly (no mailbox) to show the runtime's overhead.

    /work/venv/bin/python benchmarks/bench_actors.py --duration 2

Progress goes to stderr, the result table to stdout.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import _results
import attrs
import trio

from sbactor.actors.runtime import Actor


@attrs.define(eq=False)
class Counter(Actor):
    total: int = 0

    async def handle(self, message: Any) -> Any:
        self.total += message
        return self.total


async def cell(mode: str, senders: int, duration: float, capacity: int, batch: int) -> float:
    actor = Counter(name="bench", capacity=capacity, batch_size=batch)
    async with trio.open_nursery() as nursery:
        await nursery.start(actor.run)
        deadline = trio.current_time() + duration
        sent = 0

        async def sender() -> None:
            nonlocal sent
            while trio.current_time() < deadline:
                for _ in range(100):
                    if mode == "cast":
                        await actor.cast(1)
                    elif mode == "call":
                        await actor.call(1)
                    else:
                        await actor.handle(1)
                    sent += 1

        start = time.perf_counter()
        async with trio.open_nursery() as senders_nursery:
            for _ in range(senders):
                senders_nursery.start_soon(sender)
        await actor.stop()  # waits until every cast message has been processed
        elapsed = time.perf_counter() - start
        nursery.cancel_scope.cancel()
    processed = actor.statistics().processed if mode != "direct" else sent
    return processed / elapsed


async def main(args: argparse.Namespace) -> None:
    started = _results.start()
    rows = []
    cells = [(mode, n) for mode in ("direct", "cast", "call") for n in (1, 32)]
    for i, (mode, senders) in enumerate(cells, 1):
        print(f"[{i}/{len(cells)}] {mode} x{senders} …", file=sys.stderr, flush=True)
        rate = await cell(mode, senders, args.duration, args.capacity, args.batch)
        rows.append({"mode": mode, "senders": senders, "msgs_per_s": rate,
                     "us_per_msg": 1e6 / rate})
    print(f"\nactor runtime, mailbox {args.capacity}, batch_size {args.batch}, "
          f"{args.duration:g} s per cell, Python {sys.version.split()[0]}, trio {trio.__version__}")
    print("| mode | senders | msgs/s | µs/msg |")
    print("|---|---:|---:|---:|")
    for r in rows:
        label = "baseline: await handler directly" if r["mode"] == "direct" else r["mode"]
        print(f"| {label} | {r['senders']} | {r['msgs_per_s']:,.0f} | {r['us_per_msg']:.2f} |")
    _results.write(__file__, args, rows, started, keys=["mode", "senders"])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=2.0, help="seconds per cell")
    parser.add_argument("--capacity", type=int, default=1024, help="mailbox capacity")
    parser.add_argument("--batch", type=int, default=1, help="actor batch_size")
    trio.run(main, parser.parse_args())
