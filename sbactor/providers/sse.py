"""A tiny pure Server-Sent-Events line decoder (fed line by line, yields complete events)."""

from __future__ import annotations

import attrs


@attrs.frozen
class SSEEvent:
    event: str
    data: str


@attrs.define
class SSEDecoder:
    """Feed lines without their terminators; a blank line dispatches the pending event."""

    _event: str = ""
    _data: list[str] = attrs.field(factory=list)

    def feed(self, line: str) -> SSEEvent | None:
        if line == "":
            if not self._data and not self._event:
                return None
            out = SSEEvent(self._event or "message", "\n".join(self._data))
            self._event, self._data = "", []
            return out
        if line.startswith(":"):
            return None
        field, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if field == "data":
            self._data.append(value)
        elif field == "event":
            self._event = value
        return None

    def flush(self) -> SSEEvent | None:
        """The event pending at end of stream, if the final blank line never came."""
        return self.feed("")
