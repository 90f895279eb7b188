"""A lean HTTP/1.1 keep-alive client for upstream calls: trio streams + httptools, nothing else.

Why not httpx2 (which we used first): profiling the gateway under load showed the client's
layers (request/response models, header normalisation, pool bookkeeping, auth and redirect
wrappers) at about a fifth of all gateway CPU; an upstream call needs none of them. This pool
does one thing: POST a JSON body to one origin over reused connections and hand back the status,
headers and body (whole, or as a byte stream for SSE). Why httptools rather than h11: its C
parser (llhttp) does in one call per network read what h11 did in several Python-level events.
The request is written by hand, since it is always the same shape.

The pool resends a request only if writing it to a reused connection failed (the upstream cannot
have it whole); a break after it went out is a ``WireProtocolError`` for the resilience layer (a
counted attempt), as the upstream may have processed it.

Errors are ``WireError`` subclasses; the provider shell maps them to ``UpstreamError``. A bad
header or path given to us (not the upstream's fault) is a ``ValueError``.
"""

from __future__ import annotations

import re
import select
import ssl
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager
from urllib.parse import urlsplit

import attrs
import httptools
import trio

_READ_SIZE = 65536
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110 header name
_CTL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # CR, LF, NUL...: would let a value inject
_TARGET = re.compile(r"[!-~]+")  # printable ASCII, no space: one request-line token
_FRAMING = frozenset({"content-length", "transfer-encoding"})  # ours to set, or bodies desync
_MAX_CACHED_HEADS = 64
_MAX_HEAD = 65536  # bytes of response head (status line, headers, interim answers) we accept
_IDLE_EXPIRY_S = 4.0  # under the common 5 s server keep-alive, so we rarely race its close


class WireError(Exception):
    """Base of the client's transport errors."""


class WireConnectError(WireError): ...


class WireConnectTimeout(WireError): ...


class WirePoolTimeout(WireError): ...


class WireReadTimeout(WireError): ...


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
        host = f"[{self.host}]" if ":" in self.host else self.host  # IPv6 literal
        return host if self.port == default else f"{host}:{self.port}"


def _encode_headers(headers: Iterable[tuple[str, str]]) -> bytes:
    """``name: value\\r\\n`` lines, names lowercased. Refuses what could split or reframe the
    request: a name that is not a token, a value with CR/LF/NUL or another control byte, and
    the framing headers the pool writes itself. The message never shows the value (a key)."""
    lines = []
    for name, value in headers:
        if not _TOKEN.fullmatch(name) or _CTL.search(value):
            raise ValueError(f"invalid HTTP header {name!r}: control characters in name or value")
        name = name.lower()
        if name in _FRAMING:
            raise ValueError(f"header {name!r} is set by the connection pool")
        try:
            lines.append(b"%s: %s\r\n" % (name.encode("ascii"), value.encode("latin-1")))
        except UnicodeEncodeError:
            raise ValueError(f"HTTP header {name!r} has a non-latin-1 value") from None
    return b"".join(lines)


class _Connection:
    """One socket and the state of the response being read on it. It is also the httptools
    callback target: the ``on_*`` methods run inside ``feed`` and only record what they see."""

    __slots__ = (
        "body",
        "complete",
        "head_done",
        "head_size",
        "headers",
        "idle_since",
        "interim",
        "keep_alive",
        "parser",
        "reused",
        "status",
        "stream",
    )

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.parser = httptools.HttpResponseParser(self)
        self.reused, self.idle_since = False, 0.0  # set when pooled
        self.reset()

    def reset(self) -> None:
        """Fresh objects, not cleared ones: the last response keeps its headers."""
        self.head_size = 0  # bytes of the head so far, checked against _MAX_HEAD
        self.status = 0
        self.headers: dict[str, str] = {}
        self.body: list[bytes] = []  # parsed but not yet handed to the reader
        self.interim = self.head_done = self.complete = self.keep_alive = False

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            await self.stream.aclose()

    def feed(self, data: bytes | bytearray) -> None:
        in_head, mark = not self.head_done, self.head_size
        try:
            self.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            if self.complete:  # bytes after a whole response: it stands, the connection not
                self.keep_alive = False
                return
            raise WireProtocolError(f"bad HTTP from the upstream: {exc}") from None
        if in_head:  # a read that ends inside the head counts whole (the parser buffers a
            if not self.head_done:  # partial line); the one that ends it, by its header fields
                self.head_size = mark + len(data)
            if self.head_size > _MAX_HEAD:
                raise WireProtocolError(f"the upstream's response head is over {_MAX_HEAD} bytes")

    def feed_eof(self) -> None:
        """The peer closed: that ends a body framed by the close, anything else is cut short."""
        if self.complete:
            return
        if self.head_done and self._ends_at_close():
            self.complete, self.keep_alive = True, False
            return
        where = "in the body" if self.head_done else "before the response"
        raise WireProtocolError(f"the upstream closed the connection {where}")

    def _ends_at_close(self) -> bool:
        if self.status in (204, 304):
            return False
        te = self.headers.get("transfer-encoding")
        if te is not None:  # chunked must be the last coding; any other reads to the close
            return te.rsplit(",", 1)[-1].strip().lower() != "chunked"
        return "content-length" not in self.headers

    # httptools callbacks

    def on_message_begin(self) -> None:
        if self.complete:  # the upstream sent more than one answer: stop parsing here
            raise WireProtocolError("data after the response")

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.head_done:
            return  # a chunked body's trailers: not headers of the response already handed out
        self.head_size += len(name) + len(value) + 4
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1").rstrip(" \t")

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if status < 200:  # 100 Continue, 103 Early Hints: skipped; 101 fails in the parser
            self.interim = True
            return
        self.status = status
        self.head_done = True
        self.keep_alive = self.parser.should_keep_alive()  # HTTP version + Connection header

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        if self.interim:
            self.interim = False
            self.headers = {}
        else:
            self.complete = True


@attrs.define(eq=False)
class WireResponse:
    """An answer whose body is read on demand (``read`` or ``iter_bytes``), exactly once."""

    status: int
    headers: dict[str, str]
    _pool: WirePool
    _conn: _Connection
    _done: bool = False

    async def iter_bytes(self) -> AsyncIterator[bytes]:
        """The body as it arrives: one piece per network read (chunk framing removed)."""
        conn = self._conn
        while not self._done:
            if conn.body:
                pieces, conn.body = conn.body, []
                yield pieces[0] if len(pieces) == 1 else b"".join(pieces)
            elif conn.complete:
                self._done = True
            else:
                await self._pool._receive(conn)

    async def drain(self, timeout_s: float = 1.0) -> None:
        """Read what is left of a body we are done with (the end of an SSE stream after
        ``[DONE]``), so the connection can be reused instead of closed."""
        with trio.move_on_after(timeout_s):
            async for _ in self.iter_bytes():
                pass

    async def read(self) -> bytes:
        """The rest of the body; no per-piece generator, as this is the hot non-streaming path."""
        if self._done:
            return b""
        conn = self._conn
        while not conn.complete:
            await self._pool._receive(conn)
        self._done = True
        pieces, conn.body = conn.body, []
        return b"".join(pieces)

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


def _stale(conn: _Connection) -> bool:
    """An idle connection not to reuse: idle past ``_IDLE_EXPIRY_S`` (the upstream may be closing
    it now), or with bytes (a stray ``408``: not our answer), an EOF or an error pending."""
    if trio.current_time() - conn.idle_since > _IDLE_EXPIRY_S:
        return True
    stream = conn.stream
    while isinstance(stream, trio.SSLStream):
        stream = stream.transport_stream  # TLS: the socket under it
    sock = getattr(stream, "socket", None)
    if sock is None:  # a test double
        return False
    poller = select.poll()  # not select(), which fails on descriptors past 1023
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(0))


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
        self._base_headers = _encode_headers(
            [("host", self.origin.netloc), ("user-agent", "sbactor"), *headers.items()]
        )  # checked once here, so a bad configured header fails at startup
        self._heads: dict[str, bytes] = {}  # path -> request line + base headers
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
        request = self._request_head(path, headers) + b"content-length: %d\r\n\r\n" % len(body)
        token = object()  # released on behalf of this token, whichever task ends the request
        try:
            self._limit.acquire_on_behalf_of_nowait(token)  # the common case, without a timer
        except trio.WouldBlock:
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
            conn, response = await self._send(request + body)
            yield response
            if response._done and conn.keep_alive and not self._closed:
                conn.reset()
                conn.reused, conn.idle_since = True, trio.current_time()
                self._idle.append(conn)
                conn = None
        finally:
            if conn is not None:
                await conn.aclose()
            self._limit.release_on_behalf_of(token)

    def _request_head(self, path: str, headers: Mapping[str, str] | None) -> bytes:
        """Request line and headers, without content-length; cached per path (a provider
        posts to a handful of fixed paths)."""
        head = self._heads.get(path)
        if head is None:
            target = self.origin.base_path + path
            if not _TARGET.fullmatch(target):
                raise ValueError(f"invalid request path {target!r}")
            head = b"POST %s HTTP/1.1\r\n%s" % (target.encode("ascii"), self._base_headers)
            if len(self._heads) < _MAX_CACHED_HEADS:
                self._heads[path] = head
        if headers:
            head += _encode_headers(headers.items())
        return head

    async def _send(self, request: bytes) -> tuple[_Connection, WireResponse]:
        while True:
            conn = self._idle.pop() if self._idle else await self._connect()
            if conn.reused and _stale(conn):
                await conn.aclose()
                continue
            try:
                try:
                    await conn.stream.send_all(request)
                except (OSError, trio.BrokenResourceError) as exc:
                    if conn.reused:  # not all of it went out, so the upstream cannot act on it:
                        await conn.aclose()  # a fresh connection may carry it
                        continue
                    raise WireProtocolError(f"connection broke while sending: {exc}") from None
                while not conn.head_done:  # a break now is an error, never a resend
                    await self._receive(conn)
            except BaseException:
                await conn.aclose()
                raise
            return conn, WireResponse(conn.status, conn.headers, self, conn)

    async def _connect(self) -> _Connection:
        try:
            with trio.fail_after(self.connect_timeout_s):
                stream: trio.abc.Stream = await trio.open_tcp_stream(
                    self.origin.host, self.origin.port
                )
                if self._ssl is not None:
                    ssl_stream = trio.SSLStream(
                        stream, self._ssl, server_hostname=self.origin.host, https_compatible=True
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

    async def _receive(self, conn: _Connection) -> None:
        """One network read, fed to the connection's parser."""
        try:  # a bare CancelScope, not fail_after: no generator context manager per read
            with trio.CancelScope(deadline=trio.current_time() + self.read_timeout_s) as scope:
                data = await conn.stream.receive_some(_READ_SIZE)
        except (OSError, trio.BrokenResourceError) as exc:
            raise WireProtocolError(f"connection broke: {exc}") from None
        if scope.cancelled_caught:
            raise WireReadTimeout(f"no bytes from the upstream for {self.read_timeout_s}s")
        if data:
            conn.feed(data)
        else:
            conn.feed_eof()
