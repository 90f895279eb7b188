"""One client connection: read requests in order, run the application for each, answer errors.

Requests on a connection are served in order (pipelining is queued). A request the server
refuses (``ProtocolViolation``: malformed, too large, no ``Host``, an unknown expectation, an
upgrade, or too slow to arrive) is answered after the requests before it, in OpenAI's error
shape, and the connection closes.

A connection is *idle* only while it waits for a request with none begun and nothing buffered:
then, and only then, may the server close it at once (on shutdown, or to make room at the
connection cap). A request that has begun to arrive is read to its end and served.
"""

from __future__ import annotations

import logging
import math
import select
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs
import trio

from sbactor.http_server._access import UNKNOWN, log_access
from sbactor.http_server._exchange import READ_SIZE, Exchange
from sbactor.http_server._parse import (
    CONTINUE,
    ProtocolViolation,
    Refusal,
    Request,
    RequestReader,
    error_response,
    request_id_of,
    response_head,
)

if TYPE_CHECKING:
    from sbactor.http_server._server import HttpServer

log = logging.getLogger("sbactor.http")

_WRITE_SLICE = 65536  # write_timeout_s bounds each slice: progress, not a whole large body


@attrs.define(eq=False)
class Connection:
    server: HttpServer
    stream: trio.SocketStream
    raw: socket.socket | None = None  # the same socket: fast writes, polls without reading
    evicted: bool = False  # closed while idle to make room at the connection cap
    idle_since: float = 0.0  # when it last began waiting for a request
    _idle_wait: trio.CancelScope | None = None  # set while idle: cancelling it closes
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
        self.client = address(socket.getpeername)
        self.local = address(socket.getsockname)

    async def run(self) -> None:
        while True:
            request = await self._read_request()
            if request is None:
                return
            keep_alive = await self._serve(request)
            if not keep_alive or self.server._draining or self.evicted:
                return

    def has_unread_bytes(self) -> bool:
        """Something is waiting in the socket (or closed by the client): one poll, no read."""
        sock = self.raw
        if sock is None or sock.fileno() < 0:
            return False
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLIN | select.POLLERR | select.POLLHUP)
        return bool(poller.poll(0))

    def close_if_idle(self) -> bool:
        """Close now if idle (see the module's doc); False when busy, which closes nothing."""
        if self._idle_wait is None:
            return False
        self._idle_wait.cancel()  # the wait ends as an idle timeout would
        self._set_idle(None)
        return True

    def _set_idle(self, wait: trio.CancelScope | None) -> None:
        self._idle_wait = wait
        idle = self.server._idle  # oldest first: a connection going idle moves to the end
        if wait is None:
            idle.pop(self, None)
        else:
            self.idle_since = trio.current_time()
            idle[self] = None

    async def write(self, data: bytes) -> None:
        """Send ``data`` whole, each slice of it within ``write_timeout_s``; a client that does
        not read that long is gone: the stream is closed (waking a ``receive`` waiting on it)
        and ``BrokenResourceError`` raised.

        Fast path: almost every write fits in the kernel's send buffer, so it is tried once
        without blocking and without a timeout scope (a cancel scope per write cost the mock
        upstream a fifth of its CPU on streams); only what does not fit takes the timed path.
        """
        sent = 0
        if self.raw is not None:
            try:
                sent = self.raw.send(data)
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                raise trio.BrokenResourceError(f"send failed: {exc}") from None
            if sent == len(data):
                await trio.lowlevel.cancel_shielded_checkpoint()  # a write is a checkpoint
                return
        stream = self.stream
        seconds = self.server.limits.write_timeout_s
        with memoryview(data) as view:
            for start in range(sent, len(view), _WRITE_SLICE):
                with trio.move_on_after(seconds) as timeout:
                    await stream.send_all(view[start : start + _WRITE_SLICE])
                if timeout.cancelled_caught:
                    with trio.CancelScope(shield=True):
                        await stream.aclose()
                    raise trio.BrokenResourceError("the client did not read the response in time")

    async def _read_request(self) -> Request | None:
        """The next whole request, or None when the connection should close."""
        reader = self.reader
        limits = self.server.limits
        idle_deadline = trio.current_time() + limits.keep_alive_s
        request_deadline = math.inf
        began: float | None = None  # when this request's bytes began to arrive (access log)
        continue_sent = False
        while not reader.has_request:
            if self.violation is not None:
                violation, self.violation = self.violation, None
                await self._refuse(violation, began)
                self.linger = True  # the rest of a refused body may still be on its way
                return None
            if reader.expects_continue and not continue_sent:
                # here, not right after feed: no earlier request's response is still owed
                continue_sent = True
                await self.write(CONTINUE)
            if reader.in_progress and request_deadline == math.inf:
                request_deadline = trio.current_time() + limits.request_read_s
            if self.pending:
                data = b"".join(self.pending)
                self.pending.clear()
            else:
                idle = not reader.in_progress
                if idle and (self.server._draining or self.evicted):
                    return None
                received: bytes | None = None
                with trio.move_on_at(idle_deadline if idle else request_deadline) as wait:
                    if idle:
                        self._set_idle(wait)
                    try:
                        received = await self.stream.receive_some(READ_SIZE)
                    finally:
                        if idle:
                            self._set_idle(None)
                if received is None:  # timed out, or closed while idle
                    if reader.in_progress:
                        message = "the request was not received in time"
                        await self._refuse(reader.make_violation(408, message), began)
                    return None
                if not received:
                    return None  # the client closed
                data = received
            if began is None:
                began = time.perf_counter()
            try:
                reader.feed(data)
            except ProtocolViolation as violation:
                # whole requests parsed before the bad one still get their responses first
                self.violation = violation
        return reader.next_request()

    async def _refuse(self, violation: ProtocolViolation, began: float | None) -> None:
        """Answer a request the server refuses; the access log records it like any other."""
        started = time.perf_counter() if began is None else began
        sent = await self._send_error(violation.status, violation.message, violation.request_id)
        if self.server.access_log:
            target = violation.target
            path = UNKNOWN if target is None else target.decode("latin-1")
            log_access(violation.method or UNKNOWN, path, violation.status, sent, started,
                       self.client)

    async def _send_error(self, status: int, message: str, request_id: str | None = None) -> int:
        response = error_response(status, message, request_id=request_id)
        return await send_within(self.stream, response)

    async def _serve(self, request: Request) -> bool:
        """Run the app for one request; True when the connection can take another."""
        self.server._requests += 1
        if self.server.admission is not None:
            refusal = self.server.admission(request)
            if refusal is not None:
                return await self._refuse_early(request, refusal)
        exchange = Exchange(self, request)
        started = time.perf_counter()
        try:  # the access log sees the status the client got, the server's own 500 too
            try:
                await self.server.app(exchange.scope(), exchange.receive, exchange.send)
            except Exception:
                log.exception("application failed")
                if not exchange.head_sent and not exchange.broken:
                    await self._internal_error(exchange)
                return False
            if exchange.started_only():
                # a 204 or 304 is whole with its head; any other status ended before its first
                # byte: the client gets the status and a body cut short (no terminating chunk),
                # as the application meant, not a 500
                whole = exchange.whole_without_body()
                ending = {"type": "http.response.body", "body": b"", "more_body": not whole}
                await exchange.send(ending)
                if not whole:
                    return False
            if not exchange.head_sent and not exchange.broken:
                log.error(
                    "application returned without a response", extra={"path": request.target}
                )
                await self._internal_error(exchange)
                return False
        finally:
            if self.server.access_log:
                log_access(request.method, request.target.decode("latin-1"), exchange.status,
                           exchange.sent_bytes, started, self.client)
        return exchange.complete and not exchange.closing and not exchange.broken

    async def _refuse_early(self, request: Request, refusal: Refusal) -> bool:
        """A request the server's admission hook turned away (load shedding): the canned answer
        goes out without the application — no task, no body parsing — and the connection stays
        open, so a refused client does not come back with a new connection."""
        started = time.perf_counter()
        close = not request.keep_alive or self.server._draining
        data = response_head(refusal.status, refusal.headers, content_length=len(refusal.body),
                             close=close) + refusal.body
        try:
            await self.write(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return False
        finally:
            if self.server.access_log:
                log_access(request.method, request.target.decode("latin-1"), refusal.status,
                           len(data), started, self.client)
        return not close

    async def _internal_error(self, exchange: Exchange) -> None:
        exchange.status = 500
        request_id = request_id_of(exchange.request.headers)
        exchange.sent_bytes = await self._send_error(500, "internal gateway error", request_id)


async def send_within(stream: trio.SocketStream, data: bytes, seconds: float = 1.0) -> int:
    """Send a whole answer unless the client left or stalls: the bytes sent (0 when not all)."""
    with trio.move_on_after(seconds):
        try:
            await stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return 0
        return len(data)
    return 0


def address(get: Callable[[], Any]) -> tuple[str, int] | None:
    try:
        peer = get()
    except OSError:  # ENOTCONN: the peer reset the connection before we accepted it
        return None
    if isinstance(peer, tuple) and len(peer) >= 2:
        return str(peer[0]), int(peer[1])
    return None
