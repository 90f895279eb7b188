"""LedgerWriter: the one actor that appends usage events to the hash-chained ledger.

Being the only writer, it orders entries without a lock. It group-commits (one write and one
fsync per batch), replays and repairs the ledger on start, deduplicates by request id, writes
signed checkpoints, rotates segments, and fails closed on disk errors: ``admission()`` then
tells the gateway to refuse paid requests instead of spending without a record.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import attrs
import trio

from sbactor.actors.runtime import Actor, ActorClosed, Supervision
from sbactor.bounded import RecentKeys, compact_key
from sbactor.ledger.chain import (
    GENESIS_HASH,
    SigningKey,
    dedup_key,
    make_entry,
    normalize_event,
    rfc3339,
)
from sbactor.ledger.checkpoint import encode_checkpoint, make_checkpoint
from sbactor.ledger.config import LedgerSinkConfig
from sbactor.ledger.segments import (
    CHECKPOINT_FILE,
    fsync_directory,
    quarantine,
    segment_index,
    segment_name,
)
from sbactor.ledger.verify import LedgerCorrupt, ReplayResult, replay

log = logging.getLogger("sbactor.ledger")


class LedgerUnavailable(RuntimeError):
    """The ledger cannot record (disk error, stopped): the gateway must not spend."""


class LedgerKeyMismatch(LedgerCorrupt):
    """The existing ledger was written with another key (or none) than the configured one."""


@attrs.frozen
class Append:
    event: Mapping[str, Any]
    strict: bool = False


@attrs.frozen
class _Tick:
    """Sent by the actor's own timer: time to consider a time-based checkpoint."""


def _open_append(path: Path) -> int:
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


@attrs.define(eq=False)
class LedgerWriter(Actor):
    directory: Path = attrs.field(kw_only=True, converter=Path)
    signer: SigningKey | None = attrs.field(kw_only=True, default=None)
    on_full: Literal["backpressure", "shed"] = attrs.field(kw_only=True, default="backpressure")
    fsync: Literal["always", "batch", "never"] = attrs.field(kw_only=True, default="batch")
    durability: Literal["strict", "batch"] = attrs.field(kw_only=True, default="batch")
    checkpoint_every: int = attrs.field(kw_only=True, default=1000)
    checkpoint_interval_s: float = attrs.field(kw_only=True, default=10.0)
    segment_max_bytes: int = attrs.field(kw_only=True, default=64 * 1024 * 1024)
    dedup_capacity: int = attrs.field(kw_only=True, default=100_000)
    strict_timeout_s: float = attrs.field(kw_only=True, default=30.0)
    recover: Literal["refuse", "quarantine"] = attrs.field(kw_only=True, default="refuse")
    wall_clock: Callable[[], float] = attrs.field(kw_only=True, default=time.time)

    _next_seq: int = attrs.field(init=False, default=0)
    _head: str = attrs.field(init=False, default=GENESIS_HASH)
    _segment_index: int = attrs.field(init=False, default=0)
    _segment_size: int = attrs.field(init=False, default=0)
    _fd: int | None = attrs.field(init=False, default=None)
    _cp_fd: int | None = attrs.field(init=False, default=None)
    _dirty: bool = attrs.field(init=False, default=False)
    _failed: str | None = attrs.field(init=False, default=None)
    # the most recent dedup_capacity keys, 16 bytes each in fixed memory (built by replay)
    _dedup: RecentKeys | None = attrs.field(init=False, default=None)
    _duplicates: int = attrs.field(init=False, default=0)
    _lost: int = attrs.field(init=False, default=0)
    _fsyncs: int = attrs.field(init=False, default=0)
    _checkpoints: int = attrs.field(init=False, default=0)
    _since_checkpoint: int = attrs.field(init=False, default=0)
    _last_checkpoint_at: float = attrs.field(init=False, default=0.0)
    _recovered: list[str] = attrs.field(init=False, factory=list)

    @classmethod
    def from_config(
        cls,
        cfg: LedgerSinkConfig,
        directory: Path,
        *,
        name: str = "ledger",
        recover: Literal["refuse", "quarantine"] = "refuse",
    ) -> LedgerWriter:
        signer = SigningKey.from_seed_hex(cfg.signing_seed_hex) if cfg.signing_seed_hex else None
        return cls(
            name=name, capacity=cfg.mailbox, supervision=Supervision.ESCALATE,
            batch_size=cfg.batch_size, directory=directory, signer=signer, on_full=cfg.on_full,
            batch_window_s=cfg.batch_window_ms / 1000 if cfg.durability == "batch" else 0.0,
            fsync=cfg.fsync, durability=cfg.durability, checkpoint_every=cfg.checkpoint_every,
            checkpoint_interval_s=cfg.checkpoint_interval_s,
            segment_max_bytes=cfg.segment_max_bytes, dedup_capacity=cfg.dedup_capacity,
            strict_timeout_s=cfg.strict_timeout_s, recover=recover,
        )

    # ---- what the gateway calls ---------------------------------------------------------

    def admission(self) -> str | None:
        """None if a new paid request may start; otherwise why not (answer 503 with it)."""
        if self._failed is not None:
            return f"usage ledger unavailable: {self._failed}"
        stats = self._send.statistics()
        if self._started_at is not None and not self._running:
            return "usage ledger is not running"
        if self.on_full == "shed" and stats.current_buffer_used >= self.capacity:
            return f"usage ledger is saturated ({self.capacity} events queued); retry shortly"
        return None

    async def record(self, event: Mapping[str, Any]) -> None:
        """Append one usage event. batch durability: waits for mailbox room only; strict:
        returns once the entry is fsynced. Raises LedgerUnavailable if it cannot be recorded."""
        if self._failed is not None:
            raise LedgerUnavailable(f"usage ledger unavailable: {self._failed}")
        try:
            if self.durability != "strict":
                await self.post(Append(event))
                return
            result = await self.call(Append(event, strict=True), timeout=self.strict_timeout_s)
        except ActorClosed as exc:
            raise LedgerUnavailable(f"usage ledger unavailable: {exc}") from None
        if isinstance(result, BaseException):
            raise result

    def failure_reason(self) -> str | None:
        return self._failed

    def state_summary(self) -> dict[str, Any]:
        return {
            "seq": self._next_seq - 1,
            "entries": self._next_seq,
            "head_hash": self._head,
            "segment": segment_name(self._segment_index),
            "directory": str(self.directory),
            "failed": self._failed,
            "dedup_size": 0 if self._dedup is None else len(self._dedup),
            "dedup_capacity": self.dedup_capacity,
            "duplicates": self._duplicates,
            "lost": self._lost,
            "fsyncs": self._fsyncs,
            "fsync": self.fsync,
            "durability": self.durability,
            "checkpoints": self._checkpoints,
            "signed": self.signer is not None,
            "kid": self.signer.kid if self.signer else None,
            "public_key_hex": self.signer.public.hex if self.signer else None,
            "recovered": list(self._recovered),
        }

    # ---- lifecycle ----------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[Actor] = trio.TASK_STATUS_IGNORED) -> None:
        """The runtime loop plus a timer for time-based checkpoints."""
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._ticker)
                await super().run(task_status=task_status)
                nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            if len(group.exceptions) == 1:
                raise group.exceptions[0] from None
            raise

    async def _ticker(self) -> None:
        while True:
            await trio.sleep(self.checkpoint_interval_s)
            try:
                self.cast_nowait(_Tick())
            except trio.WouldBlock:
                pass  # busy: handle_batch checks the clock itself
            except ActorClosed:
                return

    async def on_start(self) -> None:
        pending: list[dict[str, Any]] = []
        try:
            state = await trio.to_thread.run_sync(self._replay)
        except LedgerCorrupt as exc:
            if self.recover != "quarantine" or isinstance(exc, LedgerKeyMismatch):
                raise
            stamp = rfc3339(self.wall_clock()).replace(":", "").replace(".", "-")
            moved = await trio.to_thread.run_sync(
                quarantine, self.directory, exc.segment, exc.offset, stamp
            )
            log.warning("ledger: %s; moved the broken part to %s", exc, moved)
            pending.append({"kind": "ledger_recovered", "reason": str(exc),
                            "quarantined": moved.name, "broken_seq": exc.seq})
            state = await trio.to_thread.run_sync(self._replay)
        if state.torn is not None:
            await trio.to_thread.run_sync(os.truncate, state.torn.segment, state.torn.offset)
            log.warning("ledger: truncated a torn last line (%d bytes) at %s byte %d",
                        state.torn.length, state.torn.segment.name, state.torn.offset)
            pending.append({"kind": "ledger_recovered", "reason": "torn last line",
                            "segment": state.torn.segment.name, "offset": state.torn.offset,
                            "discarded_bytes": state.torn.length})
        if state.checkpoint_torn_offset is not None:
            cp_path = self.directory / CHECKPOINT_FILE
            await trio.to_thread.run_sync(os.truncate, cp_path, state.checkpoint_torn_offset)
            log.warning("ledger: truncated a torn last line of %s", CHECKPOINT_FILE)
        self._next_seq, self._head = state.next_seq, state.head_hash
        self._dedup = state.recent
        self._since_checkpoint = state.next_seq - 1 - (
            -1 if state.last_checkpoint_seq is None else state.last_checkpoint_seq)
        if state.segment is not None:
            self._segment_index = segment_index(state.segment) or 0
            self._segment_size = state.segment_size
        self._fd = _open_append(self.directory / segment_name(self._segment_index))
        self._cp_fd = _open_append(self.directory / CHECKPOINT_FILE)
        await trio.to_thread.run_sync(fsync_directory, self.directory)
        self._last_checkpoint_at = trio.current_time()
        for event in pending:
            self._recovered.append(str(event["reason"]))
            await self._commit([event])
        if self._failed is not None:
            raise LedgerUnavailable(f"ledger could not record its recovery: {self._failed}")

    def _replay(self) -> ReplayResult:
        self.directory.mkdir(parents=True, exist_ok=True)
        state = replay(self.directory, dedup_capacity=self.dedup_capacity)
        my_kid = self.signer.kid if self.signer else None
        if state.signed is not None and state.kid != my_kid:
            raise LedgerKeyMismatch(
                f"ledger {self.directory} is signed with key {state.kid or '(none: unsigned)'}"
                f" but the configured key is {my_kid or '(none: unsigned)'}; configure the"
                " original key or use a new ledger directory",
                None, None, None,
            )
        return state

    async def on_stop(self) -> None:
        """Mailbox drained: make everything durable, write the final signed checkpoint."""
        try:
            if self._failed is None and self._fd is not None:
                await self._fsync_ledger(force=True)
                if self._since_checkpoint > 0:
                    await self._checkpoint()
        finally:
            for fd in (self._fd, self._cp_fd):
                if fd is not None:
                    os.close(fd)
            self._fd = self._cp_fd = None

    # ---- the actor's work ---------------------------------------------------------------

    async def handle(self, message: Any) -> Any:
        return (await self.handle_batch([message]))[0]

    async def handle_batch(self, messages: Sequence[Any]) -> list[Any]:
        results: list[Any] = [None] * len(messages)
        events: list[dict[str, Any]] = []
        owners: list[int] = []
        batch_keys: dict[bytes, None] = {}  # insertion order: the order they are recorded
        dedup = self._dedup
        assert dedup is not None, "handle_batch before on_start"
        for index, message in enumerate(messages):
            if not isinstance(message, Append):
                continue
            event = normalize_event(message.event)
            text = dedup_key(event)
            key = None if text is None else compact_key(text)
            if key is not None and (key in batch_keys or dedup.contains_compact(key)):
                self._duplicates += 1
                continue
            if key is not None:
                batch_keys[key] = None
            events.append(event)
            owners.append(index)
        if events:
            await self._commit(events)
            if self._failed is not None:
                error = LedgerUnavailable(f"usage ledger unavailable: {self._failed}")
                for index in owners:
                    results[index] = error
                return results
            for key in batch_keys:
                dedup.add_compact(key)  # evicts the oldest key once dedup_capacity are held
        due = trio.current_time() - self._last_checkpoint_at >= self.checkpoint_interval_s
        if self._since_checkpoint >= self.checkpoint_every or (due and self._since_checkpoint):
            await self._checkpoint()
        return results

    async def _commit(self, events: list[dict[str, Any]]) -> None:
        """Write (and fsync, per mode) a batch; on OSError enter the failed state, never raise."""
        if self._failed is not None:
            self._lose(events)
            return
        seq, head = self._next_seq, self._head
        lines: list[bytes] = []
        for event in events:
            entry, line = make_entry(head, seq, rfc3339(self.wall_clock()), event, self.signer)
            lines.append(line)
            seq, head = seq + 1, entry.entry_hash
        try:
            if self._segment_size >= self.segment_max_bytes:
                await self._rotate()
            assert self._fd is not None
            if self.fsync == "always":
                for line in lines:
                    _write_all(self._fd, line)
                    self._dirty = True
                    await self._fsync_ledger()
            else:
                _write_all(self._fd, b"".join(lines))
                self._dirty = True
                if self.fsync == "batch":
                    await self._fsync_ledger()
        except OSError as exc:
            self._fail(f"writing {segment_name(self._segment_index)}", exc)
            self._lose(events)
            return
        self._segment_size += sum(len(line) for line in lines)
        self._next_seq, self._head = seq, head
        self._since_checkpoint += len(events)

    async def _fsync_ledger(self, *, force: bool = False) -> None:
        if self._fd is None or not self._dirty or (self.fsync == "never" and not force):
            return
        await trio.to_thread.run_sync(os.fsync, self._fd)
        self._fsyncs += 1
        self._dirty = False

    async def _rotate(self) -> None:
        await self._fsync_ledger(force=self.fsync != "never")
        assert self._fd is not None
        os.close(self._fd)
        self._fd = None
        self._segment_index += 1
        self._fd = _open_append(self.directory / segment_name(self._segment_index))
        self._segment_size = 0
        if self.fsync != "never":
            await trio.to_thread.run_sync(fsync_directory, self.directory)
        log.info("ledger: rotated to %s at seq %d", segment_name(self._segment_index),
                 self._next_seq)

    async def _checkpoint(self) -> None:
        """Entries first durable, then the checkpoint naming them (never the other way)."""
        if self._failed is not None or self._next_seq == 0 or self._cp_fd is None:
            return
        cp = make_checkpoint(self._next_seq - 1, self._head, rfc3339(self.wall_clock()),
                             self.signer)
        try:
            await self._fsync_ledger(force=self.fsync != "never")
            _write_all(self._cp_fd, encode_checkpoint(cp))
            if self.fsync != "never":
                await trio.to_thread.run_sync(os.fsync, self._cp_fd)
                self._fsyncs += 1
        except OSError as exc:
            self._fail(f"writing {CHECKPOINT_FILE}", exc)
            return
        self._checkpoints += 1
        self._since_checkpoint = 0
        self._last_checkpoint_at = trio.current_time()

    def _fail(self, doing: str, exc: OSError) -> None:
        code = errno.errorcode.get(exc.errno or 0, "EIO")
        self._failed = f"disk error {doing}: {exc.strerror or exc} ({code}); restart once fixed"
        log.error("ledger: %s; refusing paid requests until restarted", self._failed)

    def _lose(self, events: list[dict[str, Any]]) -> None:
        """Events that cannot be written: counted and logged one by one, never silently."""
        self._lost += len(events)
        for event in events:
            log.error("ledger: NOT RECORDED (%s): request_id=%s", self._failed,
                      event.get("request_id"))
