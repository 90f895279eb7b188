"""A lean HTTP/1.1 keep-alive client for upstream calls: trio streams + h11, nothing else.

Why not httpx2 (which we used first): profiling the gateway under load showed the client's
layers (request/response models, header normalisation, pool bookkeeping, auth and redirect
wrappers) at about a fifth of all gateway CPU; an upstream call needs none of them. This pool
does one thing: POST a JSON body to one origin over reused connections and hand back the status,
headers and body (whole, or as a byte stream for SSE). h11 does the protocol work.

Errors are ``WireError`` subclasses; the provider shell maps them to ``UpstreamError``.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from urllib.parse import urlsplit

import attrs
import h11
import trio

_READ_SIZE = 65536


class WireError(Exception):
    """Base of the client's transport errors."""


class WireConnectError(WireError):
    pass


class WireConnectTimeout(WireError):
    pass


class WirePoolTimeout(WireError):
    pass


class WireReadTimeout(WireError):
    pass


class WireProtocolError(WireError):
    """The connection broke or the peer spoke bad HTTP."""


@attrs.frozen
class Origin:
    scheme: str
    host: str
    port: int
    base_path: str

    @classmethod
    def parse(cls, base_url: str) -> Origin:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"expected an http(s) URL, got {base_url!r}")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        return cls(parts.scheme, parts.hostname, port, parts.path.rstrip("/"))

    @property
    def netloc(self) -> str:
        default = 443 if self.scheme == "https" else 80
        return self.host if self.port == default else f"{self.host}:{self.port}"


@attrs.define(eq=False)
class _Connection:
    stream: trio.abc.Stream
    h11: h11.Connection = attrs.field(factory=lambda: h11.Connection(h11.CLIENT))
    reused: bool = False

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            await self.stream.aclose()


@attrs.define(eq=False)
class WireResponse:
    """An answer whose body is read on demand (``read`` or ``iter_bytes``), exactly once."""

    status: int
    headers: dict[str, str]
    _pool: WirePool
    _conn: _Connection
    _done: bool = False

    async def iter_bytes(self) -> AsyncIterator[bytes]:
        conn = self._conn
        while not self._done:
            event = await self._pool._next_event(conn)
            if isinstance(event, h11.Data):
                yield bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                self._done = True
            else:
                raise WireProtocolError(f"unexpected {type(event).__name__} in the body")

    async def drain(self, timeout_s: float = 1.0) -> None:
        """Read what is left of a body we are done with (the end of an SSE stream after
        ``[DONE]``), so the connection can be reused instead of closed."""
        with trio.move_on_after(timeout_s):
            async for _ in self.iter_bytes():
                pass

    async def read(self) -> bytes:
        return b"".join([piece async for piece in self.iter_bytes()])

    async def iter_lines(self) -> AsyncIterator[str]:
        """Body lines without their ending (``\\n``, ``\\r\\n`` or ``\\r``), for SSE."""
        async for batch in self.iter_line_batches():
            for line in batch:
                yield line

    async def iter_line_batches(self) -> AsyncIterator[list[str]]:
        """Complete lines grouped by the network read that completed them. Lines are split on
        bytes (``\\n``, ``\\r\\n``, ``\\r`` only — never on U+2028 inside JSON) and decoded
        whole, so a character split across reads is not mangled."""
        pending = b""
        async for piece in self.iter_bytes():
            pending += piece
            batch, pending = _split_lines(pending)
            if batch:
                yield batch
        if pending:
            yield [pending.decode("utf-8", "replace")]


def _split_lines(data: bytes) -> tuple[list[str], bytes]:
    """Complete lines of ``data`` and the unfinished rest. A trailing ``\\r`` is held back:
    it may be the first half of ``\\r\\n``."""
    lines: list[str] = []
    start = 0
    size = len(data)
    while start < size:
        nl = data.find(b"\n", start)
        cr = data.find(b"\r", start)
        if cr != -1 and (nl == -1 or cr < nl):
            if cr + 1 == size:
                break  # maybe \r\n split across reads
            end, nxt = cr, cr + 2 if data[cr + 1 : cr + 2] == b"\n" else cr + 1
        elif nl != -1:
            end, nxt = nl, nl + 1
        else:
            break
        lines.append(data[start:end].decode("utf-8", "replace"))
        start = nxt
    return lines, data[start:]


class WirePool:
    """Connections to one origin; at most ``max_connections`` open at once."""

    def __init__(
        self,
        base_url: str,
        *,
        headers: Mapping[str, str],
        max_connections: int,
        connect_timeout_s: float,
        read_timeout_s: float,
    ) -> None:
        self.origin = Origin.parse(base_url)
        self.read_timeout_s = read_timeout_s
        self.connect_timeout_s = connect_timeout_s
        self._limit = trio.CapacityLimiter(max_connections)
        self._idle: list[_Connection] = []
        self._base_headers = [
            ("host", self.origin.netloc),
            ("user-agent", "sbactor"),
            *((k.lower(), v) for k, v in headers.items()),
        ]
        self._ssl = ssl.create_default_context() if self.origin.scheme == "https" else None
        self._closed = False

    async def aclose(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            await conn.aclose()

    @asynccontextmanager
    async def post(
        self, path: str, body: bytes, headers: Mapping[str, str] | None = None
    ) -> AsyncIterator[WireResponse]:
        """POST and yield the response once its headers are in; the body is read by the caller.
        Leaving the block early closes the connection (the upstream sees the request end)."""
        token = object()  # released on behalf of this token, whichever task ends the request
        try:
            with trio.fail_after(self.read_timeout_s):
                await self._limit.acquire_on_behalf_of(token)
        except trio.TooSlowError:
            raise WirePoolTimeout(
                f"no free connection within {self.read_timeout_s}s "
                f"(pool of {int(self._limit.total_tokens)} busy)"
            ) from None
        conn: _Connection | None = None
        try:
            conn, response = await self._send(path, body, headers)
            yield response
            if (
                response._done
                and conn.h11.our_state is h11.DONE
                and conn.h11.their_state is h11.DONE
                and not self._closed
            ):
                conn.h11.start_next_cycle()
                conn.reused = True
                self._idle.append(conn)
                conn = None
        finally:
            if conn is not None:
                await conn.aclose()
            self._limit.release_on_behalf_of(token)

    async def _send(
        self, path: str, body: bytes, headers: Mapping[str, str] | None
    ) -> tuple[_Connection, WireResponse]:
        target = (self.origin.base_path + path).encode()
        extra = [(k.lower(), v) for k, v in (headers or {}).items()]
        request = h11.Request(
            method="POST",
            target=target,
            headers=[*self._base_headers, *extra, ("content-length", str(len(body)))],
        )
        while True:
            conn = self._idle.pop() if self._idle else await self._connect()
            data = (conn.h11.send(request) or b"") + (conn.h11.send(h11.Data(data=body)) or b"")
            data += conn.h11.send(h11.EndOfMessage()) or b""
            try:
                try:
                    await conn.stream.send_all(data)
                except (OSError, trio.BrokenResourceError) as exc:
                    raise WireProtocolError(f"connection broke while sending: {exc}") from None
                event = await self._next_event(conn)
            except WireProtocolError:
                await conn.aclose()
                if conn.reused:
                    continue  # a kept-alive connection the server had closed: use a fresh one
                raise
            except BaseException:
                await conn.aclose()
                raise
            if not isinstance(event, h11.Response):
                await conn.aclose()
                raise WireProtocolError(f"expected a response, got {type(event).__name__}")
            headers_out = {k.decode("latin-1"): v.decode("latin-1") for k, v in event.headers}
            return conn, WireResponse(event.status_code, headers_out, self, conn)

    async def _connect(self) -> _Connection:
        try:
            with trio.fail_after(self.connect_timeout_s):
                stream: trio.abc.Stream = await trio.open_tcp_stream(
                    self.origin.host, self.origin.port
                )
                if self._ssl is not None:
                    ssl_stream = trio.SSLStream(
                        stream,
                        self._ssl,
                        server_hostname=self.origin.host,
                        https_compatible=True,
                    )
                    await ssl_stream.do_handshake()
                    stream = ssl_stream
        except trio.TooSlowError:
            raise WireConnectTimeout(
                f"timed out connecting after {self.connect_timeout_s}s"
            ) from None
        except (OSError, trio.BrokenResourceError) as exc:
            raise WireConnectError(f"cannot connect: {exc}") from None
        return _Connection(stream)

    async def _next_event(self, conn: _Connection) -> h11.Event:
        while True:
            try:
                event = conn.h11.next_event()
            except h11.RemoteProtocolError as exc:
                raise WireProtocolError(f"bad HTTP from the upstream: {exc}") from None
            if event is not h11.NEED_DATA:
                if isinstance(event, h11.ConnectionClosed):
                    raise WireProtocolError("the upstream closed the connection")
                return event  # type: ignore[return-value]
            try:
                with trio.fail_after(self.read_timeout_s):
                    data = await conn.stream.receive_some(_READ_SIZE)
            except trio.TooSlowError:
                raise WireReadTimeout(
                    f"no bytes from the upstream for {self.read_timeout_s}s"
                ) from None
            except (OSError, trio.BrokenResourceError) as exc:
                raise WireProtocolError(f"connection broke: {exc}") from None
            conn.h11.receive_data(bytes(data))  # b"" is EOF: h11 reports it as an error or close
