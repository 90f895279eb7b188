"""The lean upstream HTTP client against raw loopback servers that misbehave on purpose."""

from __future__ import annotations

import socket
import struct
from collections.abc import Awaitable, Callable

import pytest
import trio

from sbactor.providers._wire import WirePool, WireProtocolError, _split_lines

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
