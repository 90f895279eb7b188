"""Shared pieces of the HTTP server tests (tests/e2e/test_http_server_*.py).

``HttpServer`` runs a small ASGI app in the test's nursery; the client side is a bare trio
stream with a strict little response reader, so framing mistakes (a missing last chunk, a body
on a HEAD response, a 100 Continue in the wrong place) show up as test failures rather than
being smoothed over by an HTTP client library. Timeouts are short and set per test.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
from typing import Any

import attrs
import pytest
import trio

from sbactor.http_server import HttpServer, ServerLimits
from sbactor.http_server._exchange import Message, Scope
from sbactor.http_server._parse import Headers

# -- the application ----------------------------------------------------------------------------

BIG = 16 << 20  # more than loopback's socket buffers take while the client does not read


@attrs.define(eq=False)
class App:
    """Routes by path; events let tests hold a request in flight without sleeping."""

    calls: list[str] = attrs.Factory(list)
    entered: trio.Event = attrs.Factory(trio.Event)
    release: trio.Event = attrs.Factory(trio.Event)
    later: list[Message] = attrs.Factory(list)  # what a second receive() returned
    got_later: trio.Event = attrs.Factory(trio.Event)

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        path = scope["path"]
        self.calls.append(f"{scope['method']} {path}")
        message = await receive()
        assert message["type"] == "http.request" and message["more_body"] is False
        body: bytes = message["body"]

        async def start(status: int = 200, headers: Headers | None = None) -> None:
            await send({"type": "http.response.start", "status": status,
                        "headers": headers or [(b"content-type", b"text/plain")]})

        async def part(data: bytes, more: bool = False) -> None:
            await send({"type": "http.response.body", "body": data, "more_body": more})

        if path == "/echo":
            await start()
            query = scope["query_string"]
            await part(b"%s %s?%s %s" % (scope["method"].encode(), scope["raw_path"], query, body))
        elif path == "/stream":
            await start(headers=[(b"content-type", b"text/event-stream")])
            await part(b"one", more=True)
            await part(b"two", more=True)
            await part(b"")
        elif path == "/raise-mid":
            await start()
            await part(b"one", more=True)
            raise RuntimeError("upstream went away mid-stream")
        elif path == "/raise":
            raise RuntimeError("before any response")
        elif path == "/nothing":
            return
        elif path == "/start-only":
            await start()
        elif path == "/no-content":
            await start(204)
            await part(b"ignored")  # a 204 has no body, whatever the application sends
        elif path == "/no-content-stream":
            await start(204)
            await part(b"ignored", more=True)
            await part(b"")
        elif path == "/no-content-start-only":
            await start(204)
        elif path == "/not-modified":
            await start(304, [(b"etag", b'"v1"'), (b"content-length", b"10")])
            await part(b"")
        elif path == "/early-hints":
            await start(103, [(b"link", b"</s.css>; rel=preload")])  # not forwarded
            await start()
            await part(b"final")
        elif path == "/informational-only":
            await start(100)
            await part(b"x")
        elif path == "/bad-status":
            await start(42)
            await part(b"x")
        elif path == "/slow":
            self.entered.set()
            await self.release.wait()
            await start()
            await part(b"slow done")
        elif path == "/bad-header":  # a CR or LF in a value: the head is refused
            await start(headers=[(b"x-warning", b"a\r\nx-forged: b")])
            await part(b"never sent")
        elif path == "/bad-header-caught":
            await start(headers=[(b"x-warning", b"a\nb")])
            with contextlib.suppress(ValueError):
                await part(b"never sent")
        elif path == "/big-then-give-up":  # a timeout around send (quart-trio has one)
            with trio.move_on_after(0.2):
                await start()
                await part(b"x" * BIG)
            self.entered.set()
        elif path == "/endless":  # a stream until the client is gone, as a proxied upstream's
            await start(headers=[(b"content-type", b"text/event-stream")])
            async with trio.open_nursery() as streaming:

                async def watch() -> None:
                    self.later.append(await receive())
                    self.got_later.set()
                    streaming.cancel_scope.cancel()

                streaming.start_soon(watch)
                while True:
                    await part(b"x" * 65536, more=True)
                    await trio.lowlevel.checkpoint()
        elif path == "/disconnect":
            self.entered.set()
            self.later.append(await receive())
            self.got_later.set()
            await start()  # the client is gone: dropped quietly
            await part(b"too late")
        else:
            await start(404)
            await part(b"not found")


# -- the server ---------------------------------------------------------------------------------


@attrs.define(eq=False)
class Served:
    server: HttpServer
    port: int
    stop: trio.Event
    returned: trio.Event

    async def connect(self, *, receive_buffer: int | None = None) -> Client:
        if receive_buffer is None:
            return Client(await trio.open_tcp_stream("127.0.0.1", self.port))
        sock = trio.socket.socket()  # a small window: the server's writes block sooner
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        await sock.connect(("127.0.0.1", self.port))
        return Client(trio.SocketStream(sock))

    async def wait_for(self, connections: int) -> None:
        # the server's bookkeeping, which no event reports
        while self.server.statistics().connections != connections:  # noqa: ASYNC110
            await trio.sleep(0.005)


async def serve(
    nursery: trio.Nursery,
    app: Any,
    *,
    grace_s: float = 30.0,
    access_log: bool = False,
    **limits: Any,
) -> Served:
    server = HttpServer(app, ServerLimits(**limits), access_log=access_log)
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    stop, returned = trio.Event(), trio.Event()

    async def run(task_status: trio.TaskStatus[None]) -> None:
        try:
            await server.serve(
                listeners, shutdown_trigger=stop.wait, grace_s=grace_s, task_status=task_status
            )
        finally:
            returned.set()

    await nursery.start(run)
    return Served(server, port, stop, returned)


# -- the client ---------------------------------------------------------------------------------


@attrs.define
class Response:
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    terminated: bool  # the framing said the body ended (not the connection dropping)

    def get(self, name: str) -> str | None:
        values = [v for n, v in self.headers if n == name]
        assert len(values) <= 1, f"{name} repeated: {values}"
        return values[0] if values else None

    def json(self) -> Any:
        return json.loads(self.body)


@attrs.define(eq=False)
class Client:
    stream: trio.SocketStream
    buffer: bytes = b""
    eof: bool = False

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def aclose(self) -> None:
        await self.stream.aclose()

    async def _more(self) -> bool:
        if self.eof:
            return False
        try:
            data = await self.stream.receive_some(65536)
        except trio.BrokenResourceError:  # reset by the peer
            data = b""
        if not data:
            self.eof = True
            return False
        self.buffer += data
        return True

    async def _until(self, separator: bytes) -> bytes | None:
        while separator not in self.buffer:
            if not await self._more():
                return None
        out, _, self.buffer = self.buffer.partition(separator)
        return out + separator

    async def _exactly(self, n: int) -> bytes | None:
        while len(self.buffer) < n:
            if not await self._more():
                return None
        out, self.buffer = self.buffer[:n], self.buffer[n:]
        return out

    async def read_interim_or_response_head(self) -> bytes:
        head = await self._until(b"\r\n\r\n")
        assert head is not None, f"connection closed; unparsed: {self.buffer!r}"
        return head

    async def read_response(self, *, head_request: bool = False) -> Response:
        raw = await self.read_interim_or_response_head()
        status_line, *lines = raw[:-4].decode("latin-1").split("\r\n")
        version, status, _ = status_line.split(" ", 2)
        assert version == "HTTP/1.1"
        headers = []
        for line in lines:
            name, _, value = line.partition(":")
            headers.append((name.lower(), value.strip()))
        response = Response(int(status), headers, b"", terminated=True)
        if head_request or response.status in (100, 204, 304):
            return response
        length = response.get("content-length")
        if length is not None:
            body = await self._exactly(int(length))
            assert body is not None, "connection closed inside a content-length body"
            response.body = body
        elif response.get("transfer-encoding") == "chunked":
            response.body, response.terminated = await self._chunks()
        else:  # delimited by the close
            while await self._more():
                pass
            response.body, self.buffer = self.buffer, b""
        return response

    async def _chunks(self) -> tuple[bytes, bool]:
        body = b""
        while True:
            size_line = await self._until(b"\r\n")
            if size_line is None:
                assert self.buffer == b"", f"partial chunk header {self.buffer!r}"
                return body, False
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                assert await self._until(b"\r\n") == b"\r\n"  # no trailers from this server
                return body, True
            data = await self._exactly(size + 2)
            assert data is not None and data.endswith(b"\r\n"), "chunk cut short"
            body += data[:-2]

    async def closed(self) -> bool:
        """True when the server closed the connection and sent nothing more."""
        while await self._more():
            pass
        return self.buffer == b""


def get(path: str, *extra: str, version: str = "1.1", method: str = "GET") -> bytes:
    lines = [f"{method} {path} HTTP/{version}", "host: test", *extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def post(path: str, body: bytes, *extra: str) -> bytes:
    head = get(path, f"content-length: {len(body)}", *extra, method="POST")
    return head + body


# -- access log ---------------------------------------------------------------------------------


def access_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "sbactor.access"]


async def wait_for_records(caplog: pytest.LogCaptureFixture, n: int) -> list[logging.LogRecord]:
    # the record is written after the app returns, which may be after the client has its answer
    while len(access_records(caplog)) < n:  # noqa: ASYNC110 - logging has no event
        await trio.sleep(0.005)
    return access_records(caplog)
