"""LedgerWriter actor: replay, dedup, concurrency, recovery, disk failure, shedding, rotation."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

import sbactor.actors.ledger_writer as lw
from sbactor.actors.ledger_writer import LedgerKeyMismatch, LedgerUnavailable, LedgerWriter
from sbactor.ledger.chain import SigningKey
from sbactor.ledger.config import LedgerSinkConfig
from sbactor.ledger.segments import CHECKPOINT_FILE, list_segments, segment_name
from sbactor.ledger.verify import LedgerCorrupt, verify

KEY = SigningKey.from_seed_hex("42" * 32)


def writer(directory: Path, **overrides: Any) -> LedgerWriter:
    cfg = LedgerSinkConfig(signing_seed_hex=KEY.seed_hex, **overrides)
    return LedgerWriter.from_config(cfg, directory)


def events(directory: Path) -> list[dict[str, Any]]:
    found = []
    for segment in list_segments(directory):
        found += [json.loads(line) for line in segment.read_bytes().splitlines()]
    return found


async def fill(directory: Path, ids: list[str], **overrides: Any) -> LedgerWriter:
    w = writer(directory, **overrides)
    async with trio.open_nursery() as nursery:
        await nursery.start(w.run)
        for request_id in ids:
            await w.record({"request_id": request_id, "cost_usd": 0.5})
        await w.stop()
    return w


def quarantined_tails(directory: Path) -> list[Path]:
    return list(directory.glob("quarantine-*/*.tail"))


def assert_valid(directory: Path, entries: int) -> None:
    report = verify(directory, public_key=KEY.public)
    assert report.ok, report
    assert report.entries == entries and report.signatures_checked == entries
    assert report.checkpoint_checked and report.checkpoint_seq == entries - 1


async def test_replay_and_dedup_across_restart(tmp_path: Path) -> None:
    await fill(tmp_path, [f"r{i}" for i in range(10)])
    w = await fill(tmp_path, ["r5", "r9", "r10"])  # r5, r9 are retries of recorded requests
    state = w.statistics().state
    assert state["duplicates"] == 2 and state["entries"] == 11 and state["seq"] == 10
    assert [e["event"]["request_id"] for e in events(tmp_path)][-1] == "r10"
    assert_valid(tmp_path, 11)


async def test_dedup_bound_is_respected(tmp_path: Path) -> None:
    w = await fill(tmp_path, ["a", "b", "c", "a"], dedup_capacity=2, durability="strict",
                   batch_size=1)
    assert w.statistics().state["dedup_size"] == 2
    assert w.statistics().state["duplicates"] == 0  # "a" had been evicted: recorded again
    assert len(events(tmp_path)) == 4


async def test_replay_rebuilds_the_window_of_the_newest_entries(tmp_path: Path) -> None:
    ids = [uuid.uuid4().hex for _ in range(4)]  # the gateway's own keys: held losslessly
    await fill(tmp_path, ids, dedup_capacity=3)
    w = await fill(tmp_path, [ids[3], ids[1], ids[0], ids[0]], dedup_capacity=3)
    state = w.statistics().state
    # ids[1..3] are the newest three entries: duplicates; ids[0] had left the window, so it is
    # recorded once more, and then it is a duplicate itself
    assert state["duplicates"] == 3 and state["entries"] == 5 and state["dedup_size"] == 3
    assert [e["event"]["request_id"] for e in events(tmp_path)] == [*ids, ids[0]]


async def test_dedup_is_exact_within_a_batch_and_bounded(tmp_path: Path) -> None:
    w = writer(tmp_path, dedup_capacity=100, batch_size=64, mailbox=256)
    keys = [uuid.uuid4().hex for _ in range(150)]
    async with trio.open_nursery() as nursery:
        await nursery.start(w.run)
        for key in [*keys, *keys[-100:], "fb:x:1", "fb:x:1"]:  # re-sent: the newest 100
            await w.record({"request_id": "same-x-request-id", "dedup_key": key})
        await w.stop()
    state = w.statistics().state
    assert state["entries"] == 151 and state["duplicates"] == 101
    assert state["dedup_size"] == 100
    assert w._dedup is not None and w._dedup.nbytes() < 100 * 40


async def test_feedback_events_dedup_by_dedup_key(tmp_path: Path) -> None:
    w = writer(tmp_path)
    async with trio.open_nursery() as nursery:
        await nursery.start(w.run)
        await w.record({"request_id": "r1", "cost_usd": 1})
        await w.record({"kind": "feedback", "request_id": "r1", "dedup_key": "fb:r1:1"})
        await w.record({"kind": "feedback", "request_id": "r1", "dedup_key": "fb:r1:1"})
        await w.stop()
    assert len(events(tmp_path)) == 2


async def test_many_concurrent_tasks_one_chain(tmp_path: Path) -> None:
    w = writer(tmp_path, batch_size=16, mailbox=8)
    async with trio.open_nursery() as nursery:
        await nursery.start(w.run)
        async with trio.open_nursery() as clients:
            for i in range(300):
                clients.start_soon(w.record, {"request_id": f"c{i}"})
        await w.stop()
    seqs = [e["seq"] for e in events(tmp_path)]
    assert seqs == list(range(300))
    assert {e["event"]["request_id"] for e in events(tmp_path)} == {f"c{i}" for i in range(300)}
    assert_valid(tmp_path, 300)


async def test_torn_last_line_is_truncated_and_recorded(tmp_path: Path) -> None:
    await fill(tmp_path, ["a", "b", "c"])
    with (tmp_path / segment_name(0)).open("ab") as handle:
        handle.write(b'{"seq":3,"recorded_at":"20')
    assert not verify(tmp_path).ok
    w = await fill(tmp_path, ["d"])
    recorded = events(tmp_path)
    assert recorded[3]["event"]["kind"] == "ledger_recovered"
    assert recorded[3]["event"]["discarded_bytes"] == 26
    assert recorded[4]["event"]["request_id"] == "d"
    assert w.statistics().state["recovered"] == ["torn last line"]
    assert_valid(tmp_path, 5)


async def test_broken_middle_refuses_to_start(tmp_path: Path) -> None:
    await fill(tmp_path, ["a", "b", "c", "d"])
    segment = tmp_path / segment_name(0)
    lines = segment.read_bytes().splitlines(keepends=True)
    del lines[1]
    segment.write_bytes(b"".join(lines))
    w = writer(tmp_path)
    async with trio.open_nursery() as nursery:
        with pytest.raises(LedgerCorrupt, match=r"ledger-000000.jsonl line 2 is broken at seq 1"):
            await nursery.start(w.run)


async def test_quarantine_recovery(tmp_path: Path) -> None:
    await fill(tmp_path, ["a", "b", "c", "d"])
    segment = tmp_path / segment_name(0)
    lines = segment.read_bytes().splitlines(keepends=True)
    lines[2] = lines[2].replace(b'"cost_usd":0.5', b'"cost_usd":0.0')
    segment.write_bytes(b"".join(lines))
    cfg = LedgerSinkConfig(signing_seed_hex=KEY.seed_hex)
    w = LedgerWriter.from_config(cfg, tmp_path, recover="quarantine")
    async with trio.open_nursery() as nursery:
        await nursery.start(w.run)
        await w.record({"request_id": "e"})
        await w.stop()
    recorded = events(tmp_path)
    assert [e["event"].get("request_id") for e in recorded] == ["a", "b", None, "e"]
    assert recorded[2]["event"]["broken_seq"] == 2
    quarantined = quarantined_tails(tmp_path)
    assert len(quarantined) == 1 and quarantined[0].read_bytes().count(b"\n") == 2
    assert_valid(tmp_path, 4)


async def test_tail_deleted_while_down_refuses_to_start(tmp_path: Path) -> None:
    await fill(tmp_path, ["a", "b", "c"])
    segment = tmp_path / segment_name(0)
    segment.write_bytes(b"".join(segment.read_bytes().splitlines(keepends=True)[:2]))
    async with trio.open_nursery() as nursery:
        with pytest.raises(LedgerCorrupt, match="entries deleted from the end"):
            await nursery.start(writer(tmp_path).run)


async def test_key_mismatch_refuses_to_start(tmp_path: Path) -> None:
    await fill(tmp_path, ["a"])
    other = LedgerWriter.from_config(LedgerSinkConfig(signing_seed_hex="43" * 32), tmp_path)
    async with trio.open_nursery() as nursery:
        with pytest.raises(LedgerKeyMismatch, match="configured key"):
            await nursery.start(other.run)


async def test_disk_error_fails_closed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    w = writer(tmp_path, durability="strict")
    async with trio.open_nursery() as nursery:
        await nursery.start(w.run)
        await w.record({"request_id": "ok"})
        assert w.admission() is None

        def full(fd: int, data: bytes) -> None:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(lw, "_write_all", full)
        with pytest.raises(LedgerUnavailable, match="No space left"):
            await w.record({"request_id": "lost"})
        reason = w.admission()
        assert reason is not None and "ENOSPC" in reason
        assert w.failure_reason() is not None
        with pytest.raises(LedgerUnavailable):
            await w.record({"request_id": "later"})
        state = w.statistics().state
        assert state["failed"] and state["lost"] == 1 and w.statistics().running
        await w.stop()
    assert [e["event"]["request_id"] for e in events(tmp_path)] == ["ok"]


async def test_fsync_error_fails_closed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    w = writer(tmp_path)
    async with trio.open_nursery() as nursery:
        await nursery.start(w.run)

        def broken(fd: int) -> None:
            raise OSError(errno.EIO, "Input/output error")

        monkeypatch.setattr(lw.os, "fsync", broken)
        await w.record({"request_id": "x"})  # batch durability: accepted into the mailbox
        with trio.fail_after(5):
            while w.admission() is None:  # noqa: ASYNC110 (the failure comes from a thread)
                await trio.sleep(0.005)
        assert "EIO" in (w.admission() or "")
        monkeypatch.undo()
        await w.stop()


async def test_shed_refuses_when_mailbox_full(tmp_path: Path) -> None:
    w = writer(tmp_path, mailbox=2, on_full="shed")  # not started: nothing drains the mailbox
    assert w.admission() is None
    w.cast_nowait(lw.Append({"request_id": "a"}))
    w.cast_nowait(lw.Append({"request_id": "b"}))
    assert "saturated" in (w.admission() or "")
    async with trio.open_nursery() as nursery:
        await nursery.start(w.run)
        await trio.testing.wait_all_tasks_blocked()
        assert w.admission() is None
        await w.stop()
    assert len(events(tmp_path)) == 2


async def test_backpressure_waits_and_never_drops(tmp_path: Path) -> None:
    w = writer(tmp_path, mailbox=1, on_full="backpressure")
    w.cast_nowait(lw.Append({"request_id": "a"}))
    done = trio.Event()

    async def client() -> None:
        await w.record({"request_id": "b"})
        done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(client)
        await trio.testing.wait_all_tasks_blocked()
        assert not done.is_set() and w.admission() is None  # waits, is not refused
        assert w.statistics().blocked_senders == 1
        await nursery.start(w.run)
        await done.wait()
        await w.stop()
    assert [e["event"]["request_id"] for e in events(tmp_path)] == ["a", "b"]


async def test_rotation_continues_chain_across_segments(tmp_path: Path) -> None:
    await fill(tmp_path, [f"r{i}" for i in range(40)], segment_max_bytes=2048, batch_size=1)
    first = len(list_segments(tmp_path))
    assert first > 3
    await fill(tmp_path, [f"s{i}" for i in range(5)], segment_max_bytes=2048, batch_size=1)
    assert len(list_segments(tmp_path)) >= first
    assert_valid(tmp_path, 45)


async def test_strict_returns_only_when_durable(tmp_path: Path) -> None:
    w = writer(tmp_path, durability="strict", fsync="always")
    async with trio.open_nursery() as nursery:
        await nursery.start(w.run)
        for i in range(3):
            await w.record({"request_id": f"s{i}"})
            assert len(events(tmp_path)) == i + 1
        assert w.statistics().state["fsyncs"] >= 3
        await w.stop()


async def test_time_and_count_checkpoints(tmp_path: Path, autojump_clock: Any) -> None:
    # fsync never: no worker threads, so the virtual clock alone decides
    w = writer(tmp_path, checkpoint_every=3, checkpoint_interval_s=5.0, batch_size=1,
               fsync="never")
    async with trio.open_nursery() as nursery:
        await nursery.start(w.run)
        for i in range(3):
            await w.record({"request_id": f"a{i}"})
        await trio.testing.wait_all_tasks_blocked()
        assert w.statistics().state["checkpoints"] == 1  # by count
        await w.record({"request_id": "b"})
        await trio.sleep(6)
        assert w.statistics().state["checkpoints"] == 2  # by time
        await trio.sleep(30)
        assert w.statistics().state["checkpoints"] == 2  # nothing new: no checkpoint
        await w.stop()
    assert w.statistics().state["checkpoints"] == 2  # clean stop: already covered
    assert len((tmp_path / CHECKPOINT_FILE).read_bytes().splitlines()) == 2


CHILD = textwrap.dedent(
    """
    import sys, trio
    from pathlib import Path
    from sbactor.actors.ledger_writer import LedgerWriter
    from sbactor.ledger.config import LedgerSinkConfig

    async def main():
        cfg = LedgerSinkConfig(signing_seed_hex="42" * 32, durability="strict", batch_size=8)
        w = LedgerWriter.from_config(cfg, Path(sys.argv[1]))
        async with trio.open_nursery() as nursery:
            await nursery.start(w.run)
            async def client(c):
                for i in range(100000):
                    await w.record({"request_id": f"{sys.argv[2]}-{c}-{i}"})
                    print(f"{sys.argv[2]}-{c}-{i}", flush=True)
            for c in range(8):
                nursery.start_soon(client, c)

    trio.run(main)
    """
)


def test_kill_9_strict_every_acknowledged_entry_survives(tmp_path: Path) -> None:
    acked: set[str] = set()
    for run in range(2):
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path), f"run{run}"],
                                 stdout=subprocess.PIPE, text=True)
        assert child.stdout is not None
        for _ in range(300):
            acked.add(child.stdout.readline().strip())
        child.send_signal(signal.SIGKILL)
        rest, _ = child.communicate()
        acked.update(line for line in rest.splitlines() if line)
    # a final clean start replays (truncating any torn tail) and writes a checkpoint
    trio.run(fill, tmp_path, [])
    report = verify(tmp_path, public_key=KEY.public)
    assert report.ok, report
    recorded = {e["event"].get("request_id") for e in events(tmp_path)}
    assert acked <= recorded
