"""The HTTP server over real loopback sockets, spoken to in raw bytes.

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
import struct
from typing import Any

import attrs
import pytest
import trio
import trio.testing

from sbactor.http_server import HttpServer, ServerLimits
from sbactor.http_server._exchange import Message, Scope
from sbactor.http_server._parse import Headers
from tests.conftest import MockUpstream, StartGateway, mock_config

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


# -- keep-alive and pipelining ------------------------------------------------------------------


async def test_keep_alive_serves_several_requests_on_one_connection(nursery: trio.Nursery) -> None:
    served = await serve(nursery, App())
    with trio.fail_after(5):
        client = await served.connect()
        for n in range(4):
            await client.send(post(f"/echo?n={n}", b"body-%d" % n))
            response = await client.read_response()
            assert (response.status, response.body) == (200, b"POST /echo?n=%d body-%d" % (n, n))
            assert response.get("connection") is None
            assert response.get("content-length") == str(len(response.body))
            assert (response.get("date") or "").endswith("GMT")
        stats = served.server.statistics()
        assert (stats.connections, stats.requests) == (1, 4)
        await client.aclose()


async def test_pipelined_requests_in_one_write_answer_in_order(nursery: trio.Nursery) -> None:
    app = App()
    served = await serve(nursery, app)
    with trio.fail_after(5):
        client = await served.connect()
        await client.send(get("/echo?first") + post("/echo", b"second") + get("/stream"))
        first, second, third = [await client.read_response() for _ in range(3)]
        assert first.body == b"GET /echo?first "
        assert second.body == b"POST /echo? second"
        assert (third.body, third.terminated) == (b"onetwo", True)
        assert app.calls == ["GET /echo", "POST /echo", "GET /stream"]
        await client.send(get("/echo?after"))  # the connection is still good
        assert (await client.read_response()).body == b"GET /echo?after "


async def test_pipelined_requests_before_a_bad_one_are_answered_first(
    nursery: trio.Nursery,
) -> None:
    app = App()
    served = await serve(nursery, app)
    with trio.fail_after(5):
        client = await served.connect()
        await client.send(get("/echo?a") + get("/echo?b") + b"\x01\x02 not http\r\n\r\n")
        a, b, bad = [await client.read_response() for _ in range(3)]
        assert (a.status, a.body) == (200, b"GET /echo?a ")
        assert (b.status, b.body) == (200, b"GET /echo?b ")
        assert bad.status == 400 and bad.get("connection") == "close"
        assert bad.json()["error"]["code"] == "invalid_request"
        assert await client.closed()


async def test_pipelined_upgrade_after_a_request_is_501_and_never_reaches_the_app(
    nursery: trio.Nursery,
) -> None:
    app = App()
    served = await serve(nursery, app)
    with trio.fail_after(5):
        client = await served.connect()
        upgrade = get("/ws", "connection: upgrade", "upgrade: websocket", "x-request-id: ws-1")
        await client.send(get("/echo?a") + upgrade)
        first, refused = await client.read_response(), await client.read_response()
        assert first.status == 200
        assert refused.status == 501 and refused.get("x-request-id") == "ws-1"
        assert await client.closed()
        assert app.calls == ["GET /echo"]


# -- response framing ---------------------------------------------------------------------------


async def test_streaming_response_is_chunked_and_terminated(nursery: trio.Nursery) -> None:
    served = await serve(nursery, App())
    with trio.fail_after(5):
        client = await served.connect()
        await client.send(get("/stream"))
        head = await client.read_interim_or_response_head()
        assert b"transfer-encoding: chunked\r\n" in head
        assert b"content-length" not in head
        # exact bytes: two chunks, then the last chunk (the empty final body adds no chunk)
        rest = await client._exactly(len(b"3\r\none\r\n3\r\ntwo\r\n0\r\n\r\n"))
        assert rest == b"3\r\none\r\n3\r\ntwo\r\n0\r\n\r\n"
        await client.send(get("/echo"))  # keep-alive after a chunked response
        assert (await client.read_response()).status == 200


async def test_app_raising_mid_stream_closes_without_the_last_chunk(
    nursery: trio.Nursery,
) -> None:
    served = await serve(nursery, App())
    with trio.fail_after(5):
        client = await served.connect()
        await client.send(get("/raise-mid"))
        response = await client.read_response()
        assert response.status == 200
        assert (response.body, response.terminated) == (b"one", False)
        assert client.eof


async def test_app_starting_but_never_sending_a_body_is_cut_not_500(
    nursery: trio.Nursery,
) -> None:
    served = await serve(nursery, App())
    with trio.fail_after(5):
        client = await served.connect()
        await client.send(get("/start-only"))
        response = await client.read_response()
        assert response.status == 200 and not response.terminated
        assert client.eof


@pytest.mark.parametrize("path", ["/raise", "/nothing"])
async def test_app_failing_before_responding_is_500_json(
    nursery: trio.Nursery, path: str
) -> None:
    served = await serve(nursery, App())
    with trio.fail_after(5):
        client = await served.connect()
        await client.send(get(path, "x-request-id: req-500"))
        response = await client.read_response()
        assert response.status == 500
        assert response.get("content-type") == "application/json"
        assert response.get("connection") == "close"
        assert response.get("x-request-id") == "req-500"
        assert response.json() == {"error": {"message": "internal gateway error",
                                             "type": "server_error", "code": "internal_error",
                                             "param": None}}
        assert await client.closed()


@pytest.mark.parametrize("path", ["/bad-header", "/bad-header-caught"])
async def test_a_response_header_with_cr_or_lf_is_500_not_an_empty_reply(
    nursery: trio.Nursery, path: str
) -> None:
    """The head is refused before anything is sent, so the server's 500 can still answer —
    whether the application lets the ValueError out or swallows it and returns."""
    served = await serve(nursery, App())
    with trio.fail_after(5):
        client = await served.connect()
        await client.send(get(path, "x-request-id: crlf-1"))
        response = await client.read_response()
        assert (response.status, response.get("x-request-id")) == (500, "crlf-1")
        assert response.json()["error"]["code"] == "internal_error"
        assert response.get("x-warning") is None and response.get("x-forged") is None
        assert await client.closed()


async def test_a_send_cancelled_mid_write_ends_the_connection_not_the_response(
    nursery: trio.Nursery,
) -> None:
    """An application's timeout cancels ``send`` with part of a body written: the response is
    not complete, so the next pipelined response must not follow it into the client's body."""
    app = App()
    served = await serve(nursery, app)
    with trio.fail_after(10):
        client = await served.connect(receive_buffer=4096)
        await client.send(get("/big-then-give-up") + get("/echo?second"))
        await app.entered.wait()  # the application gave up with the body part written
        head = await client.read_interim_or_response_head()
        assert head.startswith(b"HTTP/1.1 200 ") and b"content-length: %d\r\n" % BIG in head
        received, clean = len(client.buffer), client.buffer.count(b"x") == len(client.buffer)
        with trio.move_on_after(3):  # the connection closes; before the fix, it stayed open
            while True:
                try:
                    data = await client.stream.receive_some(1 << 20)
                except trio.BrokenResourceError:
                    break
                if not data:
                    break
                received += len(data)
                clean = clean and data.count(b"x") == len(data)
        assert clean, "another response was spliced into the body"
        assert 0 < received < BIG
        assert app.calls == ["GET /big-then-give-up"]


async def test_a_client_that_stops_reading_is_closed_after_write_timeout_s(
    nursery: trio.Nursery,
) -> None:
    """A stream to a client that never reads ends within ``write_timeout_s`` of the last
    progress: the application hears ``http.disconnect`` (and frees its upstream)."""
    app = App()
    served = await serve(nursery, app, write_timeout_s=0.3, keep_alive_s=60)
    with trio.fail_after(10):
        client = await served.connect(receive_buffer=4096)
        await client.send(get("/endless"))
        await app.got_later.wait()
        assert [m["type"] for m in app.later] == ["http.disconnect"]
        await served.wait_for(0)
        await client.aclose()


async def test_head_gets_no_body_and_the_connection_stays_in_sync(
    nursery: trio.Nursery,
) -> None:
    served = await serve(nursery, App())
    with trio.fail_after(5):
        client = await served.connect()
        await client.send(get("/echo", method="HEAD"))
        head = await client.read_response(head_request=True)
        assert head.status == 200
        assert head.get("content-length") == str(len(b"HEAD /echo? "))  # what GET would send
        await client.send(get("/stream", method="HEAD"))
        streamed = await client.read_response(head_request=True)
        assert streamed.get("transfer-encoding") == "chunked"
        # were any body bytes sent for either HEAD, they would now be read as the next response
        await client.send(get("/echo?next"))
        following = await client.read_response()
        assert (following.status, following.body) == (200, b"GET /echo?next ")
        assert client.buffer == b""


@pytest.mark.parametrize(
    "path", ["/no-content", "/no-content-stream", "/no-content-start-only", "/not-modified"]
)
@pytest.mark.parametrize("version", ["1.1", "1.0"])
async def test_204_and_304_end_with_their_head(
    nursery: trio.Nursery, path: str, version: str
) -> None:
    """RFC 9110 §6.4.1 and RFC 9112 §6.3: no body, no content-length, no chunked coding (not
    even the last chunk) — so the connection stays in sync and can serve the next request."""
    served = await serve(nursery, App())
    with trio.fail_after(5):
        client = await served.connect()
        await client.send(get(path, "connection: keep-alive", version=version))
        response = await client.read_response()  # the head only: the reader expects no body
        assert response.status == (304 if path == "/not-modified" else 204)
        assert response.get("content-length") is None
        assert response.get("transfer-encoding") is None
        assert response.get("connection") == (None if version == "1.1" else "keep-alive")
        if path == "/not-modified":
            assert response.get("etag") == '"v1"'
        await client.send(get("/echo?next", "connection: keep-alive", version=version))
        following = await client.read_response()
        assert (following.status, following.body) == (200, b"GET /echo?next ")
        assert client.buffer == b""


async def test_an_informational_start_before_the_final_one_is_not_forwarded(
    nursery: trio.Nursery,
) -> None:
    served = await serve(nursery, App())
    with trio.fail_after(5):
        client = await served.connect()
        await client.send(get("/early-hints"))
        response = await client.read_response()
        assert (response.status, response.body) == (200, b"final")
        assert response.get("link") is None
        await client.send(get("/echo"))
        assert (await client.read_response()).status == 200


@pytest.mark.parametrize("path", ["/informational-only", "/bad-status"])
async def test_an_informational_or_invalid_status_as_the_response_is_500(
    nursery: trio.Nursery, path: str
) -> None:
    served = await serve(nursery, App())
    with trio.fail_after(5):
        client = await served.connect()
        await client.send(get(path, "x-request-id: st-1"))
        response = await client.read_response()
        assert (response.status, response.get("x-request-id")) == (500, "st-1")
        assert response.json()["error"]["code"] == "internal_error"
        assert await client.closed()


async def test_http10_streaming_is_not_chunked_and_ends_with_the_close(
    nursery: trio.Nursery,
) -> None:
    served = await serve(nursery, App())
    with trio.fail_after(5):
        client = await served.connect()
        await client.send(get("/stream", "connection: keep-alive", version="1.0"))
        response = await client.read_response()
        assert response.get("transfer-encoding") is None
        assert response.get("connection") == "close"
        assert response.body == b"onetwo"  # raw, delimited by the close
        assert client.eof


async def test_http10_keep_alive_is_acknowledged_and_honoured(nursery: trio.Nursery) -> None:
    served = await serve(nursery, App())
    with trio.fail_after(5):
        client = await served.connect()
        for n in range(2):
            await client.send(get(f"/echo?{n}", "connection: keep-alive", version="1.0"))
            response = await client.read_response()
            assert response.get("connection") == "keep-alive"
            assert response.body == b"GET /echo?%d " % n
        await client.send(get("/echo", version="1.0"))  # no keep-alive: answered, then closed
        response = await client.read_response()
        assert response.get("connection") == "close"
        assert await client.closed()


# -- limits and timeouts ------------------------------------------------------------------------


async def test_oversize_body_is_413_and_closed_before_the_app_runs(
    nursery: trio.Nursery,
) -> None:
    app = App()
    served = await serve(nursery, app, max_body_bytes=100)
    with trio.fail_after(5):
        client = await served.connect()
        await client.send(get("/echo", "content-length: 5000", "x-request-id: big-1",
                              method="POST") + b"x" * 50)
        response = await client.read_response()
        assert response.status == 413
        assert response.get("x-request-id") == "big-1"
        assert response.get("connection") == "close"
        assert response.json()["error"]["code"] == "request_too_large"
        assert await client.closed()

        chunked = await served.connect()
        await chunked.send(get("/echo", "transfer-encoding: chunked", method="POST"))
        for _ in range(3):
            await chunked.send(b"28\r\n" + b"y" * 40 + b"\r\n")  # 120 bytes > 100
        response = await chunked.read_response()
        assert response.status == 413
        assert await chunked.closed()
        assert app.calls == []


async def test_oversize_body_still_on_its_way_gets_the_413_and_a_clean_close(
    nursery: trio.Nursery,
) -> None:
    """The client is still sending its body when the 413 goes out. The server half-closes and
    drains before closing, so the client sees the answer, then EOF — not ECONNRESET, which is
    what closing a socket with unread bytes produces (and some clients then lose the answer)."""
    served = await serve(nursery, App(), max_body_bytes=1000)
    with trio.fail_after(10):
        client = await served.connect()
        await client.send(get("/echo", "content-length: 2000000", "x-request-id: big-2",
                              method="POST"))
        sent_all = trio.Event()

        async def keep_sending() -> None:
            for _ in range(8):  # 512 KiB: arrives after the 413, within the drain limit
                await client.send(b"z" * 65536)
                await trio.sleep(0.005)
            sent_all.set()

        nursery.start_soon(keep_sending)
        await sent_all.wait()
        response = await client.read_response()
        assert (response.status, response.get("x-request-id")) == (413, "big-2")
        assert client.buffer == b""
        assert await client.stream.receive_some(65536) == b""  # FIN, not a reset


async def test_oversize_headers_are_431(nursery: trio.Nursery) -> None:
    served = await serve(nursery, App(), max_header_bytes=1024)
    with trio.fail_after(5):
        client = await served.connect()
        await client.send(get("/echo", "x-request-id: hdr-1", "x-big: " + "v" * 2000))
        response = await client.read_response()
        assert (response.status, response.get("x-request-id")) == (431, "hdr-1")
        assert await client.closed()


async def test_idle_keep_alive_connection_is_closed_after_keep_alive_s(
    nursery: trio.Nursery,
) -> None:
    served = await serve(nursery, App(), keep_alive_s=0.2)
    with trio.fail_after(5):
        client = await served.connect()
        started = trio.current_time()  # before the server's idle clock can start
        await client.send(get("/echo"))
        assert (await client.read_response()).status == 200
        assert await client.closed()  # closed quietly: an idle connection owes no answer
        assert 0.2 <= trio.current_time() - started < 2
        await served.wait_for(0)


async def test_slow_partial_request_gets_408(nursery: trio.Nursery) -> None:
    app = App()
    served = await serve(nursery, app, keep_alive_s=10, request_read_s=0.2)
    with trio.fail_after(5):
        client = await served.connect()
        started = trio.current_time()
        await client.send(b"GET /echo HTTP/1.1\r\nhost: test\r\n")  # no blank line yet
        response = await client.read_response()
        assert response.status == 408
        assert response.json()["error"]["code"] == "request_timeout"
        assert 0.2 <= trio.current_time() - started < 2
        assert await client.closed()

        body = await served.connect()  # a body that stalls counts too
        await body.send(get("/echo", "content-length: 10", method="POST") + b"abc")
        assert (await body.read_response()).status == 408
        assert app.calls == []


async def test_connection_cap_refuses_with_503_then_recovers(nursery: trio.Nursery) -> None:
    app = App()
    served = await serve(nursery, app, max_connections=2)
    with trio.fail_after(5):
        busy, half = await served.connect(), await served.connect()
        await busy.send(get("/slow"))  # the application is running
        await app.entered.wait()
        await half.send(post("/echo?half", b"0123456789")[:-4])  # a request half received
        await trio.testing.wait_all_tasks_blocked()
        third = await served.connect()  # neither is idle: no room to make
        await third.send(get("/echo"))
        refused = await third.read_response()
        assert refused.status == 503
        assert refused.get("retry-after") == "1"
        assert refused.get("connection") == "close"
        assert refused.json()["error"]["code"] == "overloaded"
        assert await third.closed()
        assert served.server.statistics().refused_connections == 1

        await half.send(b"6789")  # neither was disturbed
        assert (await half.read_response()).body == b"POST /echo?half 0123456789"
        app.release.set()
        assert (await busy.read_response()).body == b"slow done"
        await busy.aclose()
        await served.wait_for(1)
        fourth = await served.connect()
        await fourth.send(get("/echo?fourth"))
        assert (await fourth.read_response()).body == b"GET /echo?fourth "
        await half.send(get("/echo?half"))  # room was made by busy's close: half was kept
        assert (await half.read_response()).status == 200
        assert served.server.statistics().refused_connections == 1


async def test_at_the_cap_a_connection_idle_only_briefly_is_kept(nursery: trio.Nursery) -> None:
    """Under a storm every keep-alive connection is idle for a moment between requests; closing
    those would break clients already in. A newcomer gets the 503 until one has been idle for
    ``evict_idle_after_s``."""
    served = await serve(nursery, App(), max_connections=1, evict_idle_after_s=0.3)
    with trio.fail_after(5):
        regular = await served.connect()
        await regular.send(get("/echo"))
        assert (await regular.read_response()).status == 200
        newcomer = await served.connect()
        await newcomer.send(get("/echo?new"))
        refused = await newcomer.read_response()
        assert (refused.status, refused.get("retry-after")) == (503, "1")
        await regular.send(get("/echo?again"))  # the client already in is not disturbed
        assert (await regular.read_response()).status == 200
        await trio.sleep(0.35)  # now idle long enough to make room
        later = await served.connect()
        await later.send(get("/echo?later"))
        assert (await later.read_response()).status == 200
        assert await regular.closed()


async def test_at_the_cap_the_longest_idle_connection_makes_room(nursery: trio.Nursery) -> None:
    """Idle keep-alive connections (a client's pool) do not lock new clients out: at the cap,
    the connection idle the longest is closed for the new one, which is served, not 503."""
    served = await serve(nursery, App(), max_connections=2, evict_idle_after_s=0.0)
    with trio.fail_after(5):
        first, second = await served.connect(), await served.connect()
        for client in (second, first):  # first is used last: second has been idle longest
            await client.send(get("/echo"))
            assert (await client.read_response()).status == 200
        third = await served.connect()
        await third.send(get("/echo?third"))
        assert (await third.read_response()).body == b"GET /echo?third "
        assert await second.closed()  # closed quietly, between requests: it owed no answer
        await first.send(get("/echo?first"))  # the more recently used one was kept
        assert (await first.read_response()).body == b"GET /echo?first "
        stats = served.server.statistics()
        assert (stats.connections, stats.refused_connections) == (2, 0)

        never_spoke = await served.connect()  # at the cap again: third is the longest idle
        assert await third.closed()
        await served.wait_for(2)
        await trio.testing.wait_all_tasks_blocked()  # never_spoke waits for its request: idle
        fourth = await served.connect()
        await fourth.send(get("/echo?fourth"))
        assert (await fourth.read_response()).status == 200
        assert await first.closed()  # idle since its answer, before never_spoke was accepted
        assert served.server.statistics().refused_connections == 0
        await never_spoke.send(get("/echo?never"))  # a connection that never spoke yet is kept
        assert (await never_spoke.read_response()).status == 200


async def test_a_connection_reset_before_accept_does_not_stop_the_server(
    nursery: trio.Nursery,
) -> None:
    served = await serve(nursery, App())
    # blocking calls on purpose: no checkpoint, so the server cannot accept before the reset
    raw = socket.create_connection(("127.0.0.1", served.port))
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    raw.close()  # RST: the accepted socket has no peer any more (getpeername fails)
    with trio.fail_after(5):
        client = await served.connect()  # accepted after the reset one
        await client.send(get("/echo"))
        assert (await client.read_response()).status == 200
        assert not served.returned.is_set()


# -- Host (RFC 9112 §3.2) -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "head",
    [
        b"GET /echo HTTP/1.1\r\nx-request-id: host-1\r\n\r\n",
        b"GET /echo HTTP/1.1\r\nhost: a\r\nx-request-id: host-1\r\nhost: b\r\n\r\n",
        b"GET /echo HTTP/1.0\r\nhost: a\r\nx-request-id: host-1\r\nhost: a\r\n\r\n",
    ],
    ids=["missing", "two", "two-http10"],
)
async def test_missing_or_repeated_host_is_400(nursery: trio.Nursery, head: bytes) -> None:
    app = App()
    served = await serve(nursery, app)
    with trio.fail_after(5):
        client = await served.connect()
        await client.send(get("/echo?first") + head)  # the good request before it is served
        first, refused = await client.read_response(), await client.read_response()
        assert (first.status, first.body) == (200, b"GET /echo?first ")
        assert (refused.status, refused.get("x-request-id")) == (400, "host-1")
        assert refused.get("connection") == "close"
        error = refused.json()["error"]
        assert error["code"] == "invalid_request" and "host" in error["message"]
        assert await client.closed()
        assert app.calls == ["GET /echo"]


async def test_http10_without_host_is_served(nursery: trio.Nursery) -> None:
    served = await serve(nursery, App())
    with trio.fail_after(5):
        client = await served.connect()
        await client.send(b"GET /echo HTTP/1.0\r\n\r\n")
        assert (await client.read_response()).body == b"GET /echo? "


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"GET /echo\r\n\r\n", 505),  # HTTP/0.9, as llhttp reads it
        (get("/echo", "transfer-encoding: gzip, chunked", method="POST")
         + b"3\r\nabc\r\n0\r\n\r\n", 501),
    ],
    ids=["http09", "gzip-chunked"],
)
async def test_http09_is_505_and_a_coding_besides_chunked_is_501(
    nursery: trio.Nursery, raw: bytes, status: int
) -> None:
    app = App()
    served = await serve(nursery, app)
    with trio.fail_after(5):
        client = await served.connect()
        await client.send(raw)
        response = await client.read_response()
        assert response.status == status
        assert response.get("connection") == "close"
        assert await client.closed()
        assert app.calls == []


# -- Expect: 100-continue -----------------------------------------------------------------------


async def test_expect_continue_gets_100_before_the_body_is_sent(nursery: trio.Nursery) -> None:
    served = await serve(nursery, App())
    with trio.fail_after(5):
        client = await served.connect()
        await client.send(get("/echo", "content-length: 5", "expect: 100-continue",
                              method="POST"))
        assert await client.read_interim_or_response_head() == b"HTTP/1.1 100 Continue\r\n\r\n"
        await client.send(b"hello")
        response = await client.read_response()
        assert (response.status, response.body) == (200, b"POST /echo? hello")

        # the body sent along anyway: no 100 owed
        await client.send(get("/echo", "content-length: 2", "expect: 100-continue",
                              method="POST") + b"hi")
        assert (await client.read_response()).status == 200


async def test_expect_continue_behind_a_pipelined_request_waits_its_turn(
    nursery: trio.Nursery,
) -> None:
    served = await serve(nursery, App())
    with trio.fail_after(5):
        client = await served.connect()
        waiting = get("/echo", "content-length: 3", "expect: 100-continue", method="POST")
        await client.send(get("/echo?first") + waiting)
        first = await client.read_response()  # not a 100 meant for the second request
        assert (first.status, first.body) == (200, b"GET /echo?first ")
        assert await client.read_interim_or_response_head() == b"HTTP/1.1 100 Continue\r\n\r\n"
        await client.send(b"abc")
        assert (await client.read_response()).body == b"POST /echo? abc"


async def test_expect_continue_with_an_oversize_body_is_413_not_100(
    nursery: trio.Nursery,
) -> None:
    served = await serve(nursery, App(), max_body_bytes=10)
    with trio.fail_after(5):
        client = await served.connect()
        await client.send(get("/echo", "content-length: 11", "expect: 100-continue",
                              method="POST"))
        assert (await client.read_response()).status == 413
        assert await client.closed()


async def test_expect_continue_from_http10_gets_no_100(nursery: trio.Nursery) -> None:
    served = await serve(nursery, App())
    with trio.fail_after(5):
        client = await served.connect()
        await client.send(get("/echo", "content-length: 5", "expect: 100-continue",
                              method="POST", version="1.0"))
        await trio.testing.wait_all_tasks_blocked()  # the server has read the head alone
        await client.send(b"hello")
        response = await client.read_response()  # not a 100 Continue first
        assert (response.status, response.body) == (200, b"POST /echo? hello")
        assert await client.closed()


async def test_unknown_expectation_is_417(nursery: trio.Nursery) -> None:
    app = App()
    served = await serve(nursery, app)
    with trio.fail_after(5):
        client = await served.connect()
        await client.send(get("/echo", "content-length: 5", "expect: something-else",
                              "x-request-id: exp-1", method="POST"))
        response = await client.read_response()
        assert (response.status, response.get("x-request-id")) == (417, "exp-1")
        assert response.json()["error"]["code"] == "expectation_failed"
        assert await client.closed()
        assert app.calls == []


# -- disconnects and shutdown -------------------------------------------------------------------


async def test_client_leaving_during_a_slow_app_is_http_disconnect(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    app = App()
    served = await serve(nursery, app)
    with trio.fail_after(5):
        client = await served.connect()
        await client.send(get("/disconnect"))
        await app.entered.wait()
        await client.aclose()
        await app.got_later.wait()
        assert [m["type"] for m in app.later] == ["http.disconnect"]
        await served.wait_for(0)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_shutdown_closes_idle_connections_at_once(nursery: trio.Nursery) -> None:
    served = await serve(nursery, App(), grace_s=30)
    with trio.fail_after(5):
        idle = await served.connect()
        await idle.send(get("/echo"))
        assert (await idle.read_response()).status == 200
        never_spoke = await served.connect()
        await served.wait_for(2)
        started = trio.current_time()
        served.stop.set()
        await served.returned.wait()
        assert trio.current_time() - started < 1  # not the 30 s grace
        assert await idle.closed()
        assert await never_spoke.closed()


async def test_shutdown_lets_a_request_in_flight_finish_with_connection_close(
    nursery: trio.Nursery,
) -> None:
    app = App()
    served = await serve(nursery, app, grace_s=30)
    with trio.fail_after(5):
        idle = await served.connect()
        await idle.send(get("/echo"))
        assert (await idle.read_response()).status == 200
        busy = await served.connect()
        await busy.send(get("/slow"))
        await app.entered.wait()

        served.stop.set()
        assert await idle.closed()  # the idle one goes at once, the busy one is waited for
        assert not served.returned.is_set()
        with pytest.raises(OSError):  # no longer accepting
            await trio.open_tcp_stream("127.0.0.1", served.port)

        app.release.set()
        response = await busy.read_response()
        assert (response.status, response.body) == (200, b"slow done")
        assert response.get("connection") == "close"
        assert await busy.closed()
        await served.returned.wait()


@pytest.mark.parametrize(
    ("before", "after", "body"),
    [
        (get("/echo")[:20], get("/echo")[20:], b"GET /echo? "),  # cut inside the head
        (post("/echo", b"0123456789")[:-5], b"56789", b"POST /echo? 0123456789"),  # the body
    ],
    ids=["head", "body"],
)
async def test_shutdown_lets_a_half_received_request_finish(
    nursery: trio.Nursery, before: bytes, after: bytes, body: bytes
) -> None:
    app = App()
    served = await serve(nursery, app, grace_s=30)
    with trio.fail_after(5):
        idle, client = await served.connect(), await served.connect()
        await client.send(before)
        await trio.testing.wait_all_tasks_blocked()  # the server has read it
        served.stop.set()
        assert await idle.closed()  # the shutdown has begun; the other one is waited for
        await client.send(after)
        response = await client.read_response()
        assert (response.status, response.body) == (200, body)
        assert response.get("connection") == "close"
        assert await client.closed()
        await served.returned.wait()
        assert len(app.calls) == 1


async def test_shutdown_lets_a_request_told_100_continue_send_its_body(
    nursery: trio.Nursery,
) -> None:
    served = await serve(nursery, App(), grace_s=30)
    with trio.fail_after(5):
        client = await served.connect()
        await client.send(get("/echo", "content-length: 5", "expect: 100-continue",
                              method="POST"))
        assert await client.read_interim_or_response_head() == b"HTTP/1.1 100 Continue\r\n\r\n"
        served.stop.set()
        await trio.testing.wait_all_tasks_blocked()
        assert not served.returned.is_set()
        await client.send(b"hello")
        response = await client.read_response()
        assert (response.status, response.body) == (200, b"POST /echo? hello")
        assert response.get("connection") == "close"
        await served.returned.wait()


async def test_shutdown_grace_over_cuts_the_request_in_flight(nursery: trio.Nursery) -> None:
    app = App()
    served = await serve(nursery, app, grace_s=0.1)
    with trio.fail_after(5):
        busy = await served.connect()
        await busy.send(get("/slow"))
        await app.entered.wait()
        served.stop.set()
        await served.returned.wait()
        assert await busy.closed()


# -- access log ---------------------------------------------------------------------------------


def access_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "sbactor.access"]


async def wait_for_records(caplog: pytest.LogCaptureFixture, n: int) -> list[logging.LogRecord]:
    # the record is written after the app returns, which may be after the client has its answer
    while len(access_records(caplog)) < n:  # noqa: ASYNC110 - logging has no event
        await trio.sleep(0.005)
    return access_records(caplog)


async def test_access_log_records_the_status_the_client_got(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="sbactor.access")
    served = await serve(nursery, App(), access_log=True)
    with trio.fail_after(5):
        client = await served.connect()
        await client.send(post("/echo?q=1", b"abc") + get("/stream") + get("/raise"))
        statuses = [(await client.read_response()).status for _ in range(3)]
        assert statuses == [200, 200, 500]
        records = await wait_for_records(caplog, 3)
    got = [(r.method, r.path, r.status) for r in records]  # type: ignore[attr-defined]
    assert got == [("POST", "/echo?q=1", 200), ("GET", "/stream", 200), ("GET", "/raise", 500)]
    assert all(r.getMessage().startswith(f"{r.method} ") for r in records)  # type: ignore[attr-defined]


NO_HOST = b"GET /nohost HTTP/1.1\r\n\r\n"
EXPECT_ODD = get("/echo", "content-length: 5", "expect: something-else", method="POST")


@pytest.mark.parametrize(
    ("raw", "status", "method", "path"),
    [
        (b"\x01\x02 not http\r\n\r\n", 400, "-", "-"),
        (NO_HOST, 400, "GET", "/nohost"),
        (get("/echo", "content-length: 5000", method="POST"), 413, "POST", "/echo"),
        (EXPECT_ODD, 417, "POST", "/echo"),
        (get("/echo", "x-big: " + "v" * 2000), 431, "GET", "/echo"),
        (get("/ws", "connection: upgrade", "upgrade: websocket"), 501, "GET", "/ws"),
        (b"GET /slow-client HTTP/1.1\r\nhost: test\r\nx-more: ", 408, "GET", "/slow-client"),
    ],
    ids=["400", "400-host", "413", "417", "431", "501", "408"],
)
async def test_access_log_records_server_made_errors(
    nursery: trio.Nursery,
    caplog: pytest.LogCaptureFixture,
    raw: bytes,
    status: int,
    method: str,
    path: str,
) -> None:
    caplog.set_level(logging.INFO, logger="sbactor.access")
    app = App()
    served = await serve(nursery, app, access_log=True, max_body_bytes=100,
                         max_header_bytes=1024, request_read_s=0.1)
    with trio.fail_after(5):
        client = await served.connect()
        await client.send(raw)
        response = await client.read_response()
        assert response.status == status
        [record] = await wait_for_records(caplog, 1)
    assert app.calls == []
    assert (record.method, record.path, record.status) == (method, path, status)  # type: ignore[attr-defined]
    assert record.bytes > 0 and record.duration_ms >= 0  # type: ignore[attr-defined]
    assert record.client == "127.0.0.1"  # type: ignore[attr-defined]
    assert record.getMessage() == f"{method} {path} {status}"


async def test_access_log_records_the_connection_cap_refusal(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="sbactor.access")
    served = await serve(nursery, App(), access_log=True, max_connections=1)
    with trio.fail_after(5):
        held = await served.connect()
        await held.send(get("/echo"))
        assert (await held.read_response()).status == 200
        await held.send(get("/echo?next")[:-2])  # a request begun: not idle, not closed for room
        await trio.testing.wait_all_tasks_blocked()
        refused = await served.connect()
        await refused.send(get("/echo?over"))
        assert (await refused.read_response()).status == 503
        records = await wait_for_records(caplog, 2)
    got = [(r.method, r.path, r.status) for r in records]  # type: ignore[attr-defined]
    assert got == [("GET", "/echo", 200), ("GET", "/echo?over", 503)]
    assert records[1].bytes > 0  # type: ignore[attr-defined]


async def test_gateway_access_log_one_record_per_request(
    start_gateway: StartGateway,
    mock_upstream: MockUpstream,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="sbactor.access")
    config = mock_config(mock_upstream, server={"auth": "off", "access_log": True})
    gw = await start_gateway(config)
    with trio.fail_after(10):
        assert (await gw.client.get("/healthz")).status_code == 200
        assert (await gw.chat("hello")).status_code == 200
        assert (await gw.client.get("/no/such/route")).status_code == 404
        records = await wait_for_records(caplog, 3)
        await trio.sleep(0.05)  # and no more than one each
    records = access_records(caplog)
    got = [(r.method, r.path, r.status) for r in records]  # type: ignore[attr-defined]
    assert got == [
        ("GET", "/healthz", 200),
        ("POST", "/v1/chat/completions", 200),
        ("GET", "/no/such/route", 404),
    ]
    assert all(r.duration_ms >= 0 and r.bytes > 0 for r in records)  # type: ignore[attr-defined]


async def test_access_log_off_by_default(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="sbactor.access")
    served = await serve(nursery, App())
    with trio.fail_after(5):
        client = await served.connect()
        await client.send(get("/echo"))
        assert (await client.read_response()).status == 200
        await trio.sleep(0.02)
    assert access_records(caplog) == []


# -- statistics on the gateway's /metrics -------------------------------------------------------


def scraped(response: Response, name: str) -> float:
    [value] = [
        float(line.rsplit(" ", 1)[1])
        for line in response.body.decode().splitlines()
        if line.startswith(name + " ")
    ]
    return value


async def test_gateway_metrics_show_connections_refusals_and_requests(
    start_gateway: StartGateway, mock_upstream: MockUpstream
) -> None:
    config = mock_config(mock_upstream, server={"auth": "off", "max_connections": 2})
    gw = await start_gateway(config)
    port = int(gw.address.rsplit(":", 1)[1])

    async def connect() -> Client:
        return Client(await trio.open_tcp_stream("127.0.0.1", port))

    with trio.fail_after(10):
        scraper = await connect()
        await scraper.send(get("/metrics"))
        before = await scraper.read_response()
        assert scraped(before, "sbactor_http_connections") == 1
        other = await connect()
        await other.send(get("/healthz"))
        assert (await other.read_response()).status == 200
        # requests begun on both: neither is idle, so neither is closed to make room
        await other.send(get("/healthz")[:-2])
        await scraper.send(get("/metrics")[:-2])
        await trio.testing.wait_all_tasks_blocked()
        over = await connect()  # a third connection: over the cap
        await over.send(get("/healthz"))
        assert (await over.read_response()).status == 503

        await scraper.send(b"\r\n")
        after = await scraper.read_response()
        assert scraped(after, "sbactor_http_connections") == 2
        assert (
            scraped(after, "sbactor_http_refused_connections_total")
            == scraped(before, "sbactor_http_refused_connections_total") + 1
        )
        assert (  # /healthz and this scrape; the refused request never reached the app
            scraped(after, "sbactor_http_requests_total")
            == scraped(before, "sbactor_http_requests_total") + 2
        )
        assert "# TYPE sbactor_http_requests_total counter" in after.body.decode()

        await other.aclose()
        while True:  # the gauge follows the close (no event tells when the server saw it)
            await scraper.send(get("/metrics"))
            if scraped(await scraper.read_response(), "sbactor_http_connections") == 1:
                break
            await trio.sleep(0.01)
