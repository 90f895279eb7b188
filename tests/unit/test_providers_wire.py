"""The lean upstream HTTP client against raw loopback servers that misbehave on purpose."""

from __future__ import annotations

import socket
import struct
from collections.abc import Awaitable, Callable

import pytest
import trio

from sbactor.providers._wire import (
    WirePool,
    WireProtocolError,
    WireReadTimeout,
    _Connection,
    _split_lines,
)

Handler = Callable[[trio.SocketStream, int], Awaitable[None]]


async def _read_request(stream: trio.SocketStream) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        data += await stream.receive_some(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    while len(body) < length:
        body += await stream.receive_some(65536)
    return body


def _response(body: bytes, *, chunked: bool = False) -> bytes:
    if not chunked:
        return b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(body) + body
    out = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
    for i in range(0, len(body), 3):
        piece = body[i : i + 3]
        out += b"%x\r\n" % len(piece) + piece + b"\r\n"
    return out + b"0\r\n\r\n"


async def start(nursery: trio.Nursery, handler: Handler) -> tuple[str, list[int]]:
    connections: list[int] = []

    async def on_conn(stream: trio.SocketStream) -> None:
        connections.append(len(connections))
        await handler(stream, len(connections) - 1)

    listeners = await nursery.start(trio.serve_tcp, on_conn, 0)
    port = listeners[0].socket.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1", connections


def pool(url: str, *, max_connections: int = 4) -> WirePool:
    return WirePool(url, headers={}, max_connections=max_connections,
                    connect_timeout_s=2, read_timeout_s=2)


async def test_keep_alive_reuses_one_connection(nursery: trio.Nursery) -> None:
    async def handler(stream: trio.SocketStream, n: int) -> None:
        while True:
            body = await _read_request(stream)
            await stream.send_all(_response(b"echo:" + body))

    url, connections = await start(nursery, handler)
    p = pool(url)
    for i in range(5):
        async with p.post("/chat", f"{i}".encode()) as resp:
            assert resp.status == 200
            assert await resp.read() == f"echo:{i}".encode()
    assert len(connections) == 1
    await p.aclose()


async def test_chunked_body_with_split_utf8_and_line_separator(nursery: trio.Nursery) -> None:
    text = 'data: {"t": "h\u00e9llo \u2028 wor\u00efd"}\n\ndata: [DONE]\n\n'.encode()

    async def handler(stream: trio.SocketStream, n: int) -> None:
        await _read_request(stream)
        await stream.send_all(_response(text, chunked=True))  # 3-byte chunks split the é

    url, _ = await start(nursery, handler)
    p = pool(url)
    async with p.post("/chat", b"{}") as resp:
        lines = [line async for line in resp.iter_lines()]
    assert lines == ['data: {"t": "h\u00e9llo \u2028 wor\u00efd"}', "", "data: [DONE]", ""]
    await p.aclose()


async def test_a_kept_alive_connection_the_server_reset_is_retried_fresh(
    nursery: trio.Nursery,
) -> None:
    async def handler(stream: trio.SocketStream, n: int) -> None:
        await _read_request(stream)
        await stream.send_all(_response(b"ok"))
        if n == 0:  # then reset the idle connection (RST, not FIN)
            stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            await stream.aclose()
            return
        while True:
            await _read_request(stream)
            await stream.send_all(_response(b"ok"))

    url, connections = await start(nursery, handler)
    p = pool(url)
    async with p.post("/chat", b"1") as resp:
        assert await resp.read() == b"ok"
    await trio.sleep(0.05)
    async with p.post("/chat", b"2") as resp:
        assert await resp.read() == b"ok"
    assert len(connections) == 2
    await p.aclose()


async def test_a_fresh_connection_that_breaks_is_an_error(nursery: trio.Nursery) -> None:
    async def handler(stream: trio.SocketStream, n: int) -> None:
        await _read_request(stream)
        await stream.aclose()

    url, _ = await start(nursery, handler)
    p = pool(url)
    with pytest.raises(WireProtocolError):
        async with p.post("/chat", b"x"):
            pass
    await p.aclose()


async def test_cancelled_mid_body_frees_the_pool_slot(nursery: trio.Nursery) -> None:
    async def handler(stream: trio.SocketStream, n: int) -> None:
        await _read_request(stream)
        if n == 0:
            await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\npartial")
            await trio.sleep_forever()
        await stream.send_all(_response(b"ok"))

    url, _ = await start(nursery, handler)
    p = pool(url, max_connections=1)
    with trio.move_on_after(0.2):
        async with p.post("/chat", b"x") as resp:
            await resp.read()
    async with p.post("/chat", b"y") as resp:  # the only slot is free again
        assert await resp.read() == b"ok"
    await p.aclose()


def test_split_lines_holds_back_a_lone_cr_and_partial_lines() -> None:
    assert _split_lines(b"a\nb\r\nc\rd\r") == (["a", "b", "c"], b"d\r")
    assert _split_lines(b"x\r") == ([], b"x\r")
    assert _split_lines(b"\xc3") == ([], b"\xc3")


# -- scripted streams: the exact bytes (and read boundaries) the client sees --------------------


class Scripted(trio.abc.Stream):
    """A connection whose reads return ``pieces`` one by one, then EOF; records what is sent."""

    def __init__(self, *pieces: bytes) -> None:
        self.pieces = list(pieces)
        self.sent = b""
        self.closed = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await trio.lowlevel.checkpoint()
        self.sent += bytes(data)

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        await trio.lowlevel.checkpoint()
        return self.pieces.pop(0) if self.pieces else b""

    async def aclose(self) -> None:
        self.closed = True


def scripted_pool(*streams: Scripted, headers: dict[str, str] | None = None) -> WirePool:
    """A pool whose n-th new connection is ``streams[n]``."""
    p = WirePool("http://up.example/v1", headers=headers or {}, max_connections=2,
                 connect_timeout_s=2, read_timeout_s=2)
    queue = list(streams)

    async def connect() -> _Connection:
        return _Connection(queue.pop(0))

    p._connect = connect  # type: ignore[method-assign]
    return p


async def one(p: WirePool, **kw: object) -> tuple[int, dict[str, str], bytes]:
    async with p.post("/chat", b"{}", **kw) as resp:  # type: ignore[arg-type]
        return resp.status, resp.headers, await resp.read()


INTERIM_AND_CHUNKED = (
    b"HTTP/1.1 100 Continue\r\n\r\n"
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain \r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\nx-trailer: t\r\n\r\n"
)
EXPECTED = (200, {"content-type": "text/plain", "transfer-encoding": "chunked"},
            b"hello, world")


async def test_the_request_is_written_by_hand_with_the_given_headers() -> None:
    stream = Scripted(_response(b"ok"))
    p = scripted_pool(stream, headers={"Authorization": "Bearer k"})
    assert await one(p, headers={"X-Extra": "1"}) == (200, {"content-length": "2"}, b"ok")
    assert stream.sent == (
        b"POST /v1/chat HTTP/1.1\r\nhost: up.example\r\nuser-agent: sbactor\r\n"
        b"authorization: Bearer k\r\nx-extra: 1\r\ncontent-length: 2\r\n\r\n{}"
    )


async def test_a_response_split_at_every_byte_boundary_parses_the_same() -> None:
    data = INTERIM_AND_CHUNKED
    splits = [(data[:i], data[i:]) for i in range(1, len(data))]
    for pieces in [*splits, tuple(data[i : i + 1] for i in range(len(data)))]:
        stream = Scripted(*pieces)
        p = scripted_pool(stream)
        assert await one(p) == EXPECTED, pieces
        assert p._idle and not stream.closed  # fully read, keep-alive: pooled
    stream = Scripted(*splits[40])
    p = scripted_pool(stream)
    async with p.post("/chat", b"{}") as resp:
        assert b"".join([piece async for piece in resp.iter_bytes()]) == b"hello, world"


async def test_interim_responses_are_skipped_but_101_is_an_error() -> None:
    early = b"HTTP/1.1 103 Early Hints\r\nlink: </x>\r\n\r\n"
    p = scripted_pool(Scripted(early + _response(b"ok")))
    assert await one(p) == (200, {"content-length": "2"}, b"ok")
    switch = b"HTTP/1.1 101 Switching Protocols\r\nupgrade: h2c\r\nconnection: upgrade\r\n\r\n"
    for raw in (switch, b"HTTP/1.1 101 Switching Protocols\r\n\r\n"):
        with pytest.raises(WireProtocolError):
            await one(scripted_pool(Scripted(raw + _response(b"ok"))))


@pytest.mark.parametrize("raw", [
    b"HTTP/1.1 2x0 OK\r\n\r\n",
    b"HTTP/1.1 2000 OK\r\n\r\n",
    b"SMTP ready\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nbad header\r\n\r\n",
    b"HTTP/1.1 200 OK\r\ncontent-length: x\r\n\r\n",
    b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
])
async def test_malformed_responses_are_protocol_errors(raw: bytes) -> None:
    stream = Scripted(raw)
    with pytest.raises(WireProtocolError):
        await one(scripted_pool(stream))
    assert stream.closed


@pytest.mark.parametrize("raw", [
    b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort",
    b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhel",
    b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n",
    b"HTTP/1.1 200 OK\r\ncontent-le",
])
async def test_a_truncated_response_is_a_protocol_error(raw: bytes) -> None:
    stream = Scripted(raw)
    p = scripted_pool(stream)
    with pytest.raises(WireProtocolError):
        await one(p)
    assert stream.closed and not p._idle


async def test_close_delimited_bodies_and_connection_close_are_not_reused() -> None:
    cases = [
        (b"HTTP/1.0 200 OK\r\ncontent-type: text/plain\r\n\r\nuntil ", b"the close"),
        (b"HTTP/1.1 200 OK\r\n\r\nuntil the close",),
        (b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok",),
        (b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nok",),
        (_response(b"ok") + b"HTTP/1.1 200 OK\r\n",),  # more than one answer: not trusted
    ]
    for pieces in cases:
        stream = Scripted(*pieces)
        p = scripted_pool(stream)
        status, _, body = await one(p)
        assert status == 200 and body in (b"until the close", b"ok")
        assert stream.closed and not p._idle, pieces
    keep = Scripted(b"HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ncontent-length: 2\r\n\r\nok")
    p = scripted_pool(keep)
    await one(p)
    assert p._idle and not keep.closed


async def test_no_content_statuses_and_unread_bodies() -> None:
    stream = Scripted(b"HTTP/1.1 204 No Content\r\n\r\n")
    p = scripted_pool(stream)
    assert await one(p) == (204, {}, b"")
    assert p._idle
    stream = Scripted(_response(b"not read"))
    p = scripted_pool(stream)
    async with p.post("/chat", b"{}") as resp:
        assert resp.status == 200  # the body is never read: the connection is not reused
    assert stream.closed and not p._idle


async def test_header_and_path_injection_is_refused(nursery: trio.Nursery) -> None:
    async def handler(stream: trio.SocketStream, n: int) -> None:
        while True:
            await _read_request(stream)
            await stream.send_all(_response(b"ok"))

    url, connections = await start(nursery, handler)
    for bad in ({"x-a": "v\r\nx-injected: 1"}, {"x-a": "v\n"}, {"x-a": "v\x00"},
                {"x a": "v"}, {"x-a:": "v"}, {"x\r\ny": "v"}, {"": "v"},
                {"content-length": "0"}, {"Transfer-Encoding": "chunked"}, {"x-a": "\u2028"}):
        with pytest.raises(ValueError) as info:
            WirePool(url, headers=bad, max_connections=1, connect_timeout_s=1, read_timeout_s=1)
        assert "v\r" not in str(info.value)  # a value (an API key) is never echoed
        p = pool(url, max_connections=1)
        with pytest.raises(ValueError):
            async with p.post("/chat", b"x", headers=bad):
                pass
    p = pool(url, max_connections=1)
    for path in ("/chat HTTP/1.1\r\nx-injected: 1", "/a b", "/\u00e9"):
        with pytest.raises(ValueError):
            async with p.post(path, b"x"):
                pass
    assert connections == []  # nothing reached the wire
    async with p.post("/chat", b"x", headers={"x-ok": "tab\tand latin-1 \u00e9"}) as resp:
        assert await resp.read() == b"ok"  # and the only slot is still free


async def test_a_silent_upstream_is_a_read_timeout(nursery: trio.Nursery) -> None:
    async def handler(stream: trio.SocketStream, n: int) -> None:
        await _read_request(stream)
        await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\npart")
        await trio.sleep_forever()

    url, _ = await start(nursery, handler)
    p = WirePool(url, headers={}, max_connections=1, connect_timeout_s=1, read_timeout_s=0.2)
    with pytest.raises(WireReadTimeout):
        async with p.post("/chat", b"x") as resp:
            await resp.read()
    await p.aclose()


async def test_a_reused_connection_that_breaks_mid_response_is_not_retried(
    nursery: trio.Nursery,
) -> None:
    async def handler(stream: trio.SocketStream, n: int) -> None:
        await _read_request(stream)
        await stream.send_all(_response(b"ok"))
        await _read_request(stream)  # the upstream got the request and began answering
        await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-le")
        await stream.aclose()

    url, connections = await start(nursery, handler)
    p = pool(url)
    async with p.post("/chat", b"1") as resp:
        assert await resp.read() == b"ok"
    with pytest.raises(WireProtocolError):
        async with p.post("/chat", b"2"):
            pass
    assert len(connections) == 1  # a POST is not repeated once the upstream has answered
    await p.aclose()


def test_origin_netloc_brackets_ipv6_and_drops_default_port() -> None:
    from sbactor.providers._wire import Origin

    assert Origin.parse("http://[::1]:9000/v1").netloc == "[::1]:9000"
    assert Origin.parse("https://api.example.com/v1").netloc == "api.example.com"
    assert Origin.parse("http://127.0.0.1:8080").netloc == "127.0.0.1:8080"


# -- a POST reaches the upstream once: what the pool resends, and which idle connections it reuses


@pytest.mark.parametrize("reset", [False, True])
async def test_a_reused_connection_dropped_after_the_request_went_out_is_not_resent(
    nursery: trio.Nursery, reset: bool
) -> None:
    seen: list[bytes] = []

    async def handler(stream: trio.SocketStream, n: int) -> None:
        while True:
            body = await _read_request(stream)
            seen.append(body)
            if body == b"billed":  # processed (an LLM completion charged), then the line dies
                if reset:
                    linger = struct.pack("ii", 1, 0)
                    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
                await stream.aclose()
                return
            await stream.send_all(_response(b"ok"))

    url, connections = await start(nursery, handler)
    p = pool(url)
    async with p.post("/chat", b"first") as resp:
        assert await resp.read() == b"ok"
    with pytest.raises(WireProtocolError):  # for the resilience layer to retry, as an attempt
        async with p.post("/chat", b"billed"):
            pass
    assert seen == [b"first", b"billed"]  # not replayed on a fresh connection
    assert len(connections) == 1
    await p.aclose()


async def test_a_stray_answer_on_an_idle_connection_is_not_taken_for_the_next(
    nursery: trio.Nursery,
) -> None:
    stray_sent, stray_conn_ended = trio.Event(), trio.Event()
    after_stray: list[bytes] = []

    async def handler(stream: trio.SocketStream, n: int) -> None:
        while True:
            await _read_request(stream)
            await stream.send_all(_response(b"ok"))
            if n == 0:  # the idle connection times out upstream, which says so and waits
                await stream.send_all(
                    b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\n"
                    b"connection: close\r\n\r\n"
                )
                stray_sent.set()
                try:  # closed with our 408 unread: a reset, or an EOF
                    after_stray.append(await stream.receive_some(65536))
                except trio.BrokenResourceError:
                    after_stray.append(b"")
                stray_conn_ended.set()
                return

    url, connections = await start(nursery, handler)
    p = pool(url)
    async with p.post("/chat", b"a") as resp:
        assert await resp.read() == b"ok"
    await stray_sent.wait()
    await trio.sleep(0.05)  # delivered to the idle socket
    async with p.post("/chat", b"b") as resp:
        assert (resp.status, await resp.read()) == (200, b"ok")
    assert len(connections) == 2
    with trio.fail_after(2):
        await stray_conn_ended.wait()
    assert after_stray == [b""]  # the stale connection was closed, the request not sent on it
    await p.aclose()


async def test_staleness_is_polled_on_the_socket_under_a_tls_stream_too() -> None:
    import ssl

    from sbactor.providers._wire import _stale

    for tls in (False, True):
        ours, theirs = trio.socket.socketpair()
        stream: trio.abc.Stream = trio.SocketStream(ours)
        if tls:
            stream = trio.SSLStream(stream, ssl.create_default_context(), server_hostname="up")
        conn = _Connection(stream)
        conn.idle_since = trio.current_time()
        assert not _stale(conn)
        await theirs.send(b"HTTP/1.1 408 Request Timeout\r\n\r\n")
        assert _stale(conn), tls
        ours2, theirs2 = trio.socket.socketpair()
        conn = _Connection(trio.SocketStream(ours2))
        conn.idle_since = trio.current_time()
        theirs2.close()  # an EOF pending
        assert _stale(conn)
        for sock in (ours, theirs, ours2):
            sock.close()


async def test_an_idle_connection_past_its_expiry_is_closed_not_reused() -> None:
    first, second = Scripted(_response(b"1")), Scripted(_response(b"2"))
    p = scripted_pool(first, second)
    assert (await one(p))[2] == b"1"
    (idle,) = p._idle
    idle.idle_since -= 60  # the upstream may be closing it right now
    assert (await one(p))[2] == b"2"
    assert first.closed and first.sent.count(b"POST") == 1


class BreaksOnSecondSend(Scripted):
    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self.sent:
            raise trio.BrokenResourceError("the upstream had closed it")
        await super().send_all(data)


async def test_a_failed_write_to_a_reused_connection_is_resent_on_a_fresh_one() -> None:
    first, second = BreaksOnSecondSend(_response(b"1")), Scripted(_response(b"2"))
    p = scripted_pool(first, second)
    assert (await one(p))[2] == b"1"
    assert (await one(p))[2] == b"2"  # the upstream cannot have had it whole: safe to resend
    assert first.closed and second.sent.startswith(b"POST /v1/chat")


async def test_a_failed_write_to_a_fresh_connection_is_an_error() -> None:
    first = BreaksOnSecondSend(_response(b"1"))
    first.sent = b"x"  # breaks on its first write
    with pytest.raises(WireProtocolError, match="while sending"):
        await one(scripted_pool(first, Scripted(_response(b"2"))))


# -- the response head is bounded ----------------------------------------------------------------


def _head_of(size: int) -> bytes:
    headers = b"".join(b"x-h%d: %s\r\n" % (i, b"v" * 990) for i in range(size // 1000))
    return b"HTTP/1.1 200 OK\r\n" + headers + b"content-length: 2\r\n\r\nok"


async def test_a_response_head_over_64_kib_is_a_protocol_error() -> None:
    huge_value = b"HTTP/1.1 200 OK\r\nx-big: " + b"v" * 70_000 + b"\r\ncontent-length: 0\r\n\r\n"
    hints = b"HTTP/1.1 103 Early Hints\r\nlink: </x>\r\n\r\n"
    cases = [
        [_head_of(70_000)],  # in one read
        [_head_of(70_000)[i : i + 1000] for i in range(0, 71_000, 1000)],  # over many
        [huge_value[i : i + 1000] for i in range(0, len(huge_value), 1000)],  # one header
        [hints] * 2000 + [_response(b"ok")],  # interim answers without end
    ]
    for pieces in cases:
        stream = Scripted(*pieces)
        with pytest.raises(WireProtocolError, match="head is over 65536 bytes"):
            await one(scripted_pool(stream))
        assert stream.closed
        read = sum(map(len, pieces)) - sum(map(len, stream.pieces))
        assert read <= 65536 + max(map(len, pieces))  # stopped there, not buffering the rest


async def test_a_large_head_under_the_limit_is_read_in_pieces_or_whole() -> None:
    data = _head_of(60_000)
    for pieces in ([data], [data[i : i + 7000] for i in range(0, len(data), 7000)]):
        status, headers, body = await one(scripted_pool(Scripted(*pieces)))
        assert (status, len(headers), body) == (200, 61, b"ok")


# -- the shell and the resilience layer see a dropped reused connection as a connection failure --


async def test_a_dropped_reused_connection_is_a_retryable_connection_failure(
    nursery: trio.Nursery,
) -> None:
    from sbactor.providers._http import HttpShell
    from sbactor.providers.base import UpstreamConnectionError
    from sbactor.resilience.failure import FailureClass, classify_exception

    async def handler(stream: trio.SocketStream, n: int) -> None:
        await _read_request(stream)
        await stream.send_all(_response(b"{}"))
        await _read_request(stream)
        await stream.aclose()

    url, _ = await start(nursery, handler)
    shell = HttpShell(name="up", kind="openai", base_url=url, headers={}, timeout_s=2,
                      connect_timeout_s=2, max_connections=2)
    assert (await shell.post_json("/chat", {})).status == 200
    with pytest.raises(UpstreamConnectionError) as info:
        await shell.post_json("/chat", {})
    assert classify_exception(info.value).cls is FailureClass.CONNECTION
    await shell.aclose()
