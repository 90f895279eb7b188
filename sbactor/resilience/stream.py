"""The stream rule, sans I/O: failover is allowed until the first byte reaches the client.

``StreamGuard`` sits between the upstream's (OpenAI-shaped) chunks and the client. It holds back
chunks that carry nothing yet (the opening role-only delta), so a stream that is cut, errors or is
content-filtered before saying anything can still fail over to another deployment or model. Once
a chunk with content is released the stream is *committed*: a later failure ends it with an
OpenAI-style error chunk (``report.stream_error_sse``) and a clean close, never a hang and never a
``[DONE]`` that would pass the partial answer off as complete. A stall (no chunk within
``stream_idle_timeout_s``) is a ``StreamIdleTimeout`` → timeout, under the same rule.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import attrs

from sbactor.resilience.failure import Failure, FailureClass, classify_chunk

__all__ = ["StreamGuard", "StreamStatistics"]

Chunk = Mapping[str, Any]


@attrs.frozen
class StreamStatistics:
    committed: bool
    held: int
    released: int


def _has_payload(chunk: Chunk) -> bool:
    if chunk.get("usage") or chunk.get("error"):
        return True
    for choice in chunk.get("choices") or ():
        if not isinstance(choice, Mapping):
            continue
        if choice.get("finish_reason"):
            return True
        delta = choice.get("delta")
        if isinstance(delta, Mapping) and any(
            delta.get(k) for k in ("content", "refusal", "tool_calls", "function_call", "audio")
        ):
            return True
    return False


@attrs.define
class StreamGuard:
    """Decides, chunk by chunk, what to send and whether a failure may still fail over."""

    _held: list[Chunk] = attrs.field(factory=list)
    _committed: bool = False
    _released: int = 0

    @property
    def committed(self) -> bool:
        """True once any byte of the answer has been released to the client."""
        return self._committed

    def feed(self, chunk: Chunk) -> tuple[list[Chunk], Failure | None]:
        """Chunks to send now, and the failure this chunk carries (if any).

        Before commit, a failing chunk (error, content_filter, refusal) is swallowed and returned
        as the failure so the caller can fail over. After commit, an error chunk is a failure to
        end the stream with; a content_filter finish is the model's own answer and passes through.
        """
        failure = classify_chunk(chunk)
        if failure is not None and not self._committed:
            return [], failure
        if failure is not None and failure.cls is not FailureClass.CONTENT_POLICY:
            return [], failure
        if self._committed:
            self._released += 1
            return [chunk], None
        self._held.append(chunk)
        if not _has_payload(chunk):
            return [], None
        return self._release(), None

    def finish(self) -> list[Chunk]:
        """The upstream ended normally: whatever is still held (an empty answer)."""
        return self._release()

    def on_failure(self, failure: Failure) -> Literal["failover", "terminate"]:
        """What to do with a failure (exception, stall or failing chunk) at this point."""
        del failure
        return "terminate" if self._committed else "failover"

    def _release(self) -> list[Chunk]:
        out, self._held = self._held, []
        self._committed = True
        self._released += len(out)
        return out

    def statistics(self) -> StreamStatistics:
        return StreamStatistics(self._committed, len(self._held), self._released)
