"""One request and its response, as ASGI sees them: the scope, ``receive`` and ``send``.

The application's messages become bytes here: the response head waits for the first body
message (so a whole short response gets a ``content-length`` and a stream gets chunked), and
responses that have no body on the wire (HEAD, 204, 304) send their head and nothing else,
whatever the application sends after it. An informational (1xx) ``http.response.start`` is
not forwarded: the final response's start must follow it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import TYPE_CHECKING, Any

import attrs
import trio

from sbactor.http_server._parse import (
    LAST_CHUNK,
    Headers,
    Request,
    chunk,
    has_no_body,
    response_head,
)

if TYPE_CHECKING:
    from sbactor.http_server._connection import Connection

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
ASGIApp = Callable[
    [Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]],
    Awaitable[None],
]

READ_SIZE = 65536
_PENDING_LIMIT = 65536  # pipelined bytes buffered while a request runs


@attrs.define(eq=False)
class Exchange:
    """One request and its response: ASGI's ``receive`` and ``send`` for the application."""

    connection: Connection
    request: Request
    body_delivered: bool = False
    head_sent: bool = False
    complete: bool = False
    broken: bool = False  # the client left or the socket failed
    chunked: bool = False
    bodiless: bool = False  # HEAD, 204, 304: the head is all that goes on the wire
    closing: bool = False  # the response says connection: close (or ends with the close)
    status: int = 0
    sent_bytes: int = 0
    _head: tuple[int, Headers] | None = None

    def started_only(self) -> bool:
        """``http.response.start`` was sent by the application, but no body message."""
        return self._head is not None and not self.head_sent and not self.broken

    def whole_without_body(self) -> bool:
        """The pending start is a 204 or 304: its head alone is the whole response."""
        return self._head is not None and has_no_body(self._head[0])

    def scope(self) -> Scope:
        request = self.request
        raw_path, _, query = request.target.partition(b"?")
        if raw_path.startswith((b"http://", b"https://")):  # absolute form: keep the path
            raw_path = b"/" + raw_path.split(b"/", 3)[-1] if raw_path.count(b"/") > 2 else b"/"
        return {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": request.http_version,
            "method": request.method,
            "scheme": "http",
            "path": _unquote(raw_path),
            "raw_path": raw_path,
            "query_string": query,
            "root_path": "",
            "headers": request.headers,
            "client": self.connection.client,
            "server": self.connection.local,
            "extensions": {},
        }

    # -- receive --------------------------------------------------------------------------

    async def receive(self) -> Message:
        if not self.body_delivered:
            self.body_delivered = True
            return {"type": "http.request", "body": self.request.body, "more_body": False}
        if self.complete or self.broken:
            return {"type": "http.disconnect"}
        return await self._wait_for_disconnect()

    async def _wait_for_disconnect(self) -> Message:
        connection = self.connection
        buffered = sum(len(piece) for piece in connection.pending)
        while True:
            if buffered > _PENDING_LIMIT:
                await trio.sleep_forever()  # stop reading; the app cancels us when it is done
            try:
                data = await connection.stream.receive_some(READ_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            if not data:
                self.broken = True
                return {"type": "http.disconnect"}
            connection.pending.append(data)  # a pipelined request: served after this one
            buffered += len(data)

    # -- send -----------------------------------------------------------------------------

    async def send(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            status = message["status"]
            if not isinstance(status, int) or not 100 <= status <= 999:
                raise RuntimeError(f"http.response.start with an invalid status {status!r}")
            if status >= 200:  # a 1xx is dropped: there is no interim response to send
                self._head = (status, list(message.get("headers", ())))
            return
        if kind != "http.response.body" or self.complete:
            return
        if self.broken:
            return  # as ASGI servers do: the app learns of it from receive()
        body: bytes = message.get("body", b"")
        more: bool = message.get("more_body", False)
        if not self.head_sent:
            out = self._start(body, more)
        elif self.bodiless:
            out = b""
        elif self.chunked:
            out = (chunk(body) if body else b"") + (b"" if more else LAST_CHUNK)
        else:
            out = body
        if out:
            try:
                await self.connection.write(out)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self.broken = True  # the client left, or stopped reading (write_timeout_s)
                return
            except BaseException:
                # cancelled (an app's timeout around send, say) with part of ``out`` written:
                # the rest of the response can never follow, nor may a next one be spliced on
                self.broken = True
                raise
            self.sent_bytes += len(out)
        self.complete = not more  # only once all of it is written

    def _start(self, body: bytes, more: bool) -> bytes:
        """The head (and the first body bytes) to send; the response counts as started only
        once the head is built: a header the head refuses (CR or LF) leaves the server's 500."""
        if self._head is None:
            raise RuntimeError("http.response.body before a final http.response.start")
        status, headers = self._head
        close = (
            not self.request.keep_alive
            or self.connection.server._draining
            or self.connection.evicted
        )
        http10 = self.request.http_version == "1.0"
        chunked = False
        content_length: int | None = None
        if has_no_body(status):  # no framing, no body, not even a last chunk
            bodiless = True
        else:
            bodiless = self.request.method == "HEAD"
            if more and not any(name.lower() == b"content-length" for name, _ in headers):
                chunked = not http10  # HTTP/1.0 has no chunks: the body ends with the close
                close = close or http10
            else:
                content_length = len(body)
        try:
            head = response_head(
                status, headers, content_length=content_length, close=close, http10=http10
            )
        except Exception:
            self._head = None  # nothing started: the application's error (or return) gets a 500
            raise
        self.status, self.head_sent = status, True
        self.bodiless, self.chunked, self.closing = bodiless, chunked, close
        if bodiless:
            return head
        return head + (chunk(body) if body and chunked else body)


def _unquote(raw_path: bytes) -> str:
    if b"%" not in raw_path:
        return raw_path.decode("latin-1")
    from urllib.parse import unquote_to_bytes

    return unquote_to_bytes(raw_path).decode("utf-8", "replace")
