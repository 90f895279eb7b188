"""The HTTP/1.1 server: trio sockets around the sans-I/O core in ``_parse``, speaking ASGI.

Why not hypercorn (which we used first): on this 2-core machine hypercorn spent ~590 µs of CPU per
request on a trivial reply at concurrency 1, this server ~140 µs (h11 alone: ~290 µs) — about a
third of the gateway's whole added latency (benchmarks/README.md). A gateway also needs two
things hypercorn does not give: a cap on open connections that answers 503 cheaply instead of
parsing every request of a connection storm, and a shutdown that closes idle keep-alive
connections at once instead of waiting out the grace period.

One task per connection; requests on a connection are served in order (pipelining is queued).
While the application runs, a second ``receive()`` watches the socket for the client leaving,
as ASGI's ``http.disconnect``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import attrs
import trio

from sbactor.http_server._parse import (
    CONTINUE,
    LAST_CHUNK,
    Headers,
    ProtocolViolation,
    Request,
    RequestReader,
    chunk,
    error_response,
    request_id_of,
    response_head,
)

log = logging.getLogger("sbactor.http")
access_log = logging.getLogger("sbactor.access")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
ASGIApp = Callable[
    [Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]],
    Awaitable[None],
]

_READ_SIZE = 65536
_MAX_REFUSING = 512  # over-cap connections answered 503 at once; beyond, closed unanswered
_LINGER_LIMIT = 1 << 20  # request bytes read and dropped after an early error answer
_PENDING_LIMIT = 65536  # pipelined bytes buffered while a request runs


@attrs.frozen
class ServerLimits:
    max_connections: int = 2048
    max_body_bytes: int = 4 * 1024 * 1024
    max_header_bytes: int = 64 * 1024
    keep_alive_s: float = 75.0  # idle time between requests before we close
    request_read_s: float = 30.0  # from a request's first byte to its last


@attrs.frozen
class ServerStatistics:
    connections: int
    refused_connections: int
    requests: int


@attrs.define(eq=False)
class HttpServer:
    """Serve ``app`` on listeners until ``shutdown`` is called, then drain within ``grace_s``."""

    app: ASGIApp
    limits: ServerLimits = attrs.field(factory=ServerLimits)
    access_log: bool = False
    _connections: set[_Connection] = attrs.field(factory=set, init=False)
    _refused: int = attrs.field(default=0, init=False)
    _refusing: int = attrs.field(default=0, init=False)  # refusals being answered now
    _requests: int = attrs.field(default=0, init=False)
    _draining: bool = attrs.field(default=False, init=False)
    _all_closed: trio.Event = attrs.field(factory=trio.Event, init=False)

    async def _refuse(self, stream: trio.SocketStream) -> None:
        """Over the connection cap: a canned 503 that never reaches the application."""
        self._refusing += 1
        try:
            with trio.move_on_after(1.0):
                await stream.receive_some(_READ_SIZE)
            with trio.move_on_after(1.0):
                message = "the gateway is at its connection limit; retry shortly"
                await stream.send_all(error_response(503, message, extra=[(b"retry-after", b"1")]))
            await linger_close(stream, seconds=0.5)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            await _close(stream)
        finally:
            self._refusing -= 1

    def statistics(self) -> ServerStatistics:
        return ServerStatistics(len(self._connections), self._refused, self._requests)

    async def serve(
        self,
        listeners: list[trio.SocketListener],
        *,
        shutdown_trigger: Callable[[], Awaitable[object]],
        grace_s: float,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        async with trio.open_nursery() as connections:
            async with trio.open_nursery() as acceptors:
                for listener in listeners:
                    acceptors.start_soon(self._accept_loop, listener, connections)
                task_status.started()
                await shutdown_trigger()
                acceptors.cancel_scope.cancel()  # stop accepting; open connections go on
            for listener in listeners:
                await listener.aclose()
            await self._drain(grace_s)
            connections.cancel_scope.cancel()

    async def _drain(self, grace_s: float) -> None:
        """Idle connections close now; busy ones after their current response."""
        self._draining = True
        for connection in list(self._connections):
            if connection.idle:
                connection.scope.cancel()
        if self._connections:
            with trio.move_on_after(grace_s):
                await self._all_closed.wait()
            if self._connections:
                log.warning("shutdown grace over", extra={"connections": len(self._connections)})

    async def _accept_loop(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:  # EMFILE and friends: back off instead of spinning
                log.warning("accept failed", extra={"error": str(exc)})
                await trio.sleep(0.1)
                continue
            if len(self._connections) >= self.limits.max_connections:
                self._refused += 1
                if self._refusing < _MAX_REFUSING:
                    nursery.start_soon(self._refuse, stream)
                else:  # a storm beyond even that: drop at once, spend nothing
                    await _close(stream)
                continue
            connection = _Connection(self, stream)
            self._connections.add(connection)
            nursery.start_soon(self._run_connection, connection)

    async def _run_connection(self, connection: _Connection) -> None:
        try:
            with connection.scope:
                await connection.run()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client went away mid-write
        except Exception:
            log.exception("connection failed")
        finally:
            self._connections.discard(connection)
            if connection.linger:
                with trio.CancelScope(shield=True):
                    await linger_close(connection.stream)
            else:
                await _close(connection.stream)
            if self._draining and not self._connections:
                self._all_closed.set()


async def _close(stream: trio.SocketStream) -> None:
    with trio.CancelScope(shield=True):
        await stream.aclose()


async def linger_close(stream: trio.SocketStream, *, seconds: float = 1.0) -> None:
    """Close after an early answer without resetting the connection: closing with unread
    request bytes makes the kernel send RST, and some clients then drop the answer they were
    sent. So: FIN our side, read and discard what the client still sends (bounded), close."""
    try:
        await stream.send_eof()
        discarded = 0
        with trio.move_on_after(seconds):
            while discarded < _LINGER_LIMIT:
                data = await stream.receive_some(_READ_SIZE)
                if not data:
                    break
                discarded += len(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass
    finally:
        await _close(stream)


@attrs.define(eq=False)
class _Connection:
    server: HttpServer
    stream: trio.SocketStream
    scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    idle: bool = True  # waiting for a request: may be closed at once on shutdown
    reader: RequestReader = attrs.field(init=False)
    pending: list[bytes] = attrs.field(factory=list)  # read while a request ran
    violation: ProtocolViolation | None = None  # answered after the requests before it
    linger: bool = False  # closing after an early error answer: drain before close
    client: tuple[str, int] | None = attrs.field(init=False)
    local: tuple[str, int] | None = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        limits = self.server.limits
        self.reader = RequestReader(
            max_header_bytes=limits.max_header_bytes, max_body_bytes=limits.max_body_bytes
        )
        socket = self.stream.socket
        self.client = _address(socket.getpeername)
        self.local = _address(socket.getsockname)

    async def run(self) -> None:
        while True:
            request = await self._read_request()
            if request is None:
                return
            self.idle = False
            keep_alive = await self._serve(request)
            self.idle = True
            if not keep_alive or self.server._draining:
                return

    async def _read_request(self) -> Request | None:
        """The next whole request, or None when the connection should close."""
        reader = self.reader
        limits = self.server.limits
        idle_deadline = trio.current_time() + limits.keep_alive_s
        request_deadline = math.inf
        continue_sent = False
        while not reader.has_request:
            if self.violation is not None:
                violation, self.violation = self.violation, None
                await self._send_error(
                    violation.status, violation.message, request_id=violation.request_id
                )
                self.linger = True  # the rest of a refused body may still be on its way
                return None
            if reader.expects_continue and not continue_sent:
                # here, not right after feed: no earlier request's response is still owed
                continue_sent = True
                await self.stream.send_all(CONTINUE)
            if reader.in_progress and request_deadline == math.inf:
                request_deadline = trio.current_time() + limits.request_read_s
            if self.pending:
                data = b"".join(self.pending)
                self.pending.clear()
            else:
                received: bytes | None = None
                with trio.move_on_at(request_deadline if reader.in_progress else idle_deadline):
                    received = await self.stream.receive_some(_READ_SIZE)
                if received is None:  # timed out
                    if reader.in_progress:
                        await self._send_error(408, "the request was not received in time")
                    return None
                if not received:
                    return None  # the client closed
                data = received
            try:
                reader.feed(data)
            except ProtocolViolation as violation:
                # whole requests parsed before the bad one still get their responses first
                self.violation = violation
        return reader.next_request()

    async def _send_error(self, status: int, message: str, request_id: str | None = None) -> None:
        with trio.move_on_after(1.0):
            await self.stream.send_all(error_response(status, message, request_id=request_id))

    async def _serve(self, request: Request) -> bool:
        """Run the app for one request; True when the connection can take another."""
        self.server._requests += 1
        exchange = _Exchange(self, request)
        started = time.perf_counter()
        try:  # the access log sees the status the client got, the server's own 500 too
            try:
                await self.server.app(exchange.scope(), exchange.receive, exchange.send)
            except Exception:
                log.exception("application failed")
                if not exchange.head_sent and not exchange.broken:
                    exchange.status = 500
                    await self._send_error(
                        500, "internal gateway error", request_id_of(request.headers)
                    )
                return False
            if exchange.started_only():
                # a stream that ended before its first byte: the client gets the status and a
                # body cut short (no terminating chunk), as the application meant, not a 500
                await exchange.send({"type": "http.response.body", "body": b"", "more_body": True})
                return False
            if not exchange.head_sent and not exchange.broken:
                log.error(
                    "application returned without a response", extra={"path": request.target}
                )
                exchange.status = 500
                await self._send_error(
                    500, "internal gateway error", request_id_of(request.headers)
                )
                return False
        finally:
            if self.server.access_log:
                _log_access(request, exchange, started)
        return exchange.complete and not exchange.closing and not exchange.broken


@attrs.define(eq=False)
class _Exchange:
    """One request and its response: ASGI's ``receive`` and ``send`` for the application."""

    connection: _Connection
    request: Request
    body_delivered: bool = False
    head_sent: bool = False
    complete: bool = False
    broken: bool = False  # the client left or the socket failed
    chunked: bool = False
    closing: bool = False  # the response says connection: close (or ends with the close)
    status: int = 0
    sent_bytes: int = 0
    _head: tuple[int, Headers] | None = None

    def started_only(self) -> bool:
        """``http.response.start`` was sent by the application, but no body message."""
        return self._head is not None and not self.head_sent and not self.broken

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
                data = await connection.stream.receive_some(_READ_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            if not data:
                self.broken = True
                return {"type": "http.disconnect"}
            connection.pending.append(data)  # a pipelined request: served after this one
            buffered += len(data)

    async def send(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            self._head = (message["status"], list(message.get("headers", ())))
            return
        if kind != "http.response.body" or self.complete:
            return
        if self.broken:
            return  # as ASGI servers do: the app learns of it from receive()
        body: bytes = message.get("body", b"")
        more: bool = message.get("more_body", False)
        if not self.head_sent:
            out = self._start(body, more)
        elif self.request.method == "HEAD":
            out = b""
        elif self.chunked:
            out = (chunk(body) if body else b"") + (b"" if more else LAST_CHUNK)
        else:
            out = body
        self.complete = not more
        if out:
            try:
                await self.connection.stream.send_all(out)
                self.sent_bytes += len(out)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self.broken = True

    def _start(self, body: bytes, more: bool) -> bytes:
        if self._head is None:
            raise RuntimeError("http.response.body before http.response.start")
        status, headers = self._head
        self.status = status
        self.head_sent = True
        close = not self.request.keep_alive or self.connection.server._draining
        http10 = self.request.http_version == "1.0"
        has_length = any(name.lower() == b"content-length" for name, _ in headers)
        if more and not has_length:
            self.chunked = not http10  # HTTP/1.0 has no chunks: the body ends with the close
            close = close or http10
            self.closing = close
            head = response_head(status, headers, content_length=None, close=close, http10=http10)
            if self.request.method == "HEAD":
                return head
            return head + (chunk(body) if body and self.chunked else body)
        self.closing = close
        head = response_head(
            status, headers, content_length=len(body), close=close, http10=http10
        )
        return head if self.request.method == "HEAD" else head + body


def _unquote(raw_path: bytes) -> str:
    if b"%" not in raw_path:
        return raw_path.decode("latin-1")
    from urllib.parse import unquote_to_bytes

    return unquote_to_bytes(raw_path).decode("utf-8", "replace")


def _address(get: Callable[[], Any]) -> tuple[str, int] | None:
    try:
        address = get()
    except OSError:  # ENOTCONN: the peer reset the connection before we accepted it
        return None
    if isinstance(address, tuple) and len(address) >= 2:
        return str(address[0]), int(address[1])
    return None


def _log_access(request: Request, exchange: _Exchange, started: float) -> None:
    access_log.info(
        "%s %s %d",
        request.method,
        request.target.decode("latin-1"),
        exchange.status,
        extra={
            "method": request.method,
            "path": request.target.decode("latin-1"),
            "status": exchange.status,
            "bytes": exchange.sent_bytes,
            "duration_ms": round((time.perf_counter() - started) * 1000, 3),
            "client": exchange.connection.client[0] if exchange.connection.client else None,
        },
    )
