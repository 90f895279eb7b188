"""Usage sinks: where each finished request's event goes, off the latency path.

A sink is anything with ``async record(event_dict)``. The JSONL sink is a small actor that owns
its file; the ledger sink is the LedgerWriter actor.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import attrs
import orjson
import trio

from sbactor.actors.runtime import Actor, Supervision


class UsageSink(Protocol):
    name: str

    async def record(self, event: Mapping[str, Any]) -> None: ...

    def admission(self) -> str | None: ...


@attrs.define(eq=False)
class JsonlSink(Actor):
    """Appends one JSON line per event; flushes each batch (fsync at shutdown)."""

    path: Path = attrs.field(kw_only=True)
    _file: Any = attrs.field(init=False, default=None)
    _written: int = attrs.field(init=False, default=0)
    _failure: str | None = attrs.field(init=False, default=None)

    async def on_start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = await trio.to_thread.run_sync(open, self.path, "ab")

    async def handle_batch(self, messages: Sequence[Any]) -> list[Any]:
        data = b"".join(orjson.dumps(m) + b"\n" for m in messages)
        try:
            self._file.write(data)
            self._file.flush()
        except OSError as exc:
            self._failure = f"usage log {self.path}: {exc.strerror or exc}"
            raise
        self._written += len(messages)
        return [None] * len(messages)

    async def on_stop(self) -> None:
        if self._file is not None:
            self._file.flush()
            await trio.to_thread.run_sync(os.fsync, self._file.fileno())
            self._file.close()

    async def record(self, event: Mapping[str, Any]) -> None:
        await self.post(event)

    def admission(self) -> str | None:
        return self._failure

    def state_summary(self) -> dict[str, Any]:
        return {"path": str(self.path), "written": self._written, "failure": self._failure}


def make_jsonl_sink(path: Path, mailbox: int) -> JsonlSink:
    return JsonlSink(
        name="usage_jsonl",
        capacity=mailbox,
        supervision=Supervision.RESTART,
        batch_size=256,
        path=path,
    )
