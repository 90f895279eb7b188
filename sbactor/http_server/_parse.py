"""Sans-I/O HTTP/1.1 for the server: bytes in, whole requests out; response heads as bytes.

``httptools`` (llhttp, the parser uvicorn uses) does the protocol work; this module adds what a
gateway needs around it: size limits that answer with the right status instead of buffering
without bound, pipelined requests queued in order, the ``Host`` rule of RFC 9112 §3.2, and
``Expect`` (``100-continue`` honoured from HTTP/1.1 clients, anything else 417). Bodies are
collected whole (they are bounded by ``max_body_bytes``), so the application sees one request
message, as every inference route needs the whole JSON anyway.
"""

from __future__ import annotations

import time
from collections import deque
from email.utils import formatdate
from http import HTTPStatus

import attrs
import httptools

from sbactor.errors import error_body
from sbactor.logs import request_id_from

Headers = list[tuple[bytes, bytes]]


class ProtocolViolation(Exception):
    """The client broke HTTP or a limit; answer ``status`` and close the connection."""

    def __init__(
        self,
        status: int,
        message: str,
        request_id: str | None = None,
        *,
        method: str | None = None,
        target: bytes | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.request_id = request_id  # the client's x-request-id, when headers were read
        self.method = method  # the request line, once it was read whole (for the access log)
        self.target = target


@attrs.define(eq=False, slots=True)
class Request:
    method: str
    target: bytes
    http_version: str
    headers: Headers  # names lower-cased, as ASGI wants them
    body: bytes
    keep_alive: bool


def request_id_of(headers: Headers) -> str | None:
    """The client's ``x-request-id`` (unchecked: ``error_response`` vets it)."""
    for name, value in headers:
        if name == b"x-request-id":
            return value.decode("latin-1")
    return None


@attrs.frozen
class Refusal:
    """A whole answer given without the application (the server's admission hook)."""

    status: int
    headers: Headers
    body: bytes


class RequestReader:
    """Feed bytes with ``feed``; take finished requests with ``next_request``.

    Raises ``ProtocolViolation`` for malformed input (400), an HTTP/1.1 request without a
    ``Host`` or any request with two (400), a header block over ``max_header_bytes`` (431), a
    body over ``max_body_bytes`` (413), an expectation other than ``100-continue`` (417),
    upgrade requests and transfer codings other than ``chunked`` alone (501), and any HTTP
    version but 1.0 and 1.1 (505: llhttp would take ``GET /`` as HTTP/0.9).
    """

    def __init__(self, *, max_header_bytes: int, max_body_bytes: int) -> None:
        self.max_header_bytes = max_header_bytes
        self.max_body_bytes = max_body_bytes
        self._parser = httptools.HttpRequestParser(self)
        self._ready: deque[Request] = deque()
        self._violation: ProtocolViolation | None = None
        self._reset()

    def _reset(self) -> None:
        self._target = b""
        self._headers: Headers = []
        self._header_bytes = 0
        self._body: list[bytes] = []
        self._body_bytes = 0
        self._request_id: str | None = None
        # known once the request line is whole: httptools tells at the first header (or the
        # end of the head), so a request cut off inside its first header line has none yet
        self.method: str | None = None
        self._headers_done = False
        self._began_in_feed = False  # this message's first byte is in the current feed
        self._head_bytes_fed = 0  # later feeds that ended with the head still incomplete
        self.in_progress = False  # a request has begun and is not complete
        self.expects_continue = False  # headers asked for 100-continue; body not read yet

    # -- public ---------------------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        self._began_in_feed = False
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # llhttp completes the upgrade request before it stops: it must not be served
            upgrade = self._ready.pop() if self._ready else None
            raise ProtocolViolation(
                501,
                "protocol upgrades are not supported",
                request_id_of(upgrade.headers) if upgrade else None,
                method=upgrade.method if upgrade else None,
                target=upgrade.target if upgrade else None,
            ) from None
        except httptools.HttpParserError as exc:
            if self._violation is not None:
                raise self._violation from None
            raise self.make_violation(400, f"malformed HTTP request: {exc}") from None
        if self.in_progress and not self._headers_done and not self._began_in_feed:
            # httptools buffers a header's name and value until the header ends, so a single
            # endless header would never reach on_header: bound the unfinished head here.
            self._head_bytes_fed += len(data)
            if self._head_bytes_fed > 2 * self.max_header_bytes:
                self._fail(431, self._headers_too_large())

    def next_request(self) -> Request | None:
        return self._ready.popleft() if self._ready else None

    @property
    def has_request(self) -> bool:
        return bool(self._ready)

    @property
    def target(self) -> bytes | None:
        """The request target of the request in progress, once its request line is whole."""
        return self._target if self.method is not None else None

    def make_violation(self, status: int, message: str) -> ProtocolViolation:
        """A violation about the request in progress, with what is known of it so far."""
        return ProtocolViolation(
            status, message, self._request_id, method=self.method, target=self.target
        )

    # -- httptools callbacks --------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._reset()
        self.in_progress = True
        self._began_in_feed = True

    def on_url(self, url: bytes) -> None:
        self._target += url
        self._count_header_bytes(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._request_line_read()
        self._count_header_bytes(len(name) + len(value) + 4)
        if self._headers_done:
            return  # a chunked body's trailer: never merged into the request's headers
        name = name.lower()
        if name == b"x-request-id":  # known before any limit below can fail the request
            self._request_id = value.decode("latin-1")
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        self._request_line_read()
        self._headers_done = True
        version = self._parser.get_http_version()
        if version not in ("1.0", "1.1"):  # llhttp takes "GET /" as 0.9, and reads 2.0 too
            self._fail(505, f"HTTP/{version} is not supported: send HTTP/1.1")
        http11 = version == "1.1"
        hosts = 0
        codings: list[bytes] = []
        for name, value in self._headers:
            if name == b"host":
                hosts += 1
            elif name == b"content-length" and value.isdigit():
                if int(value) > self.max_body_bytes:
                    self._fail(413, self._too_large())
            elif name == b"expect":
                self._expect(value.strip().lower(), http11)
            elif name == b"transfer-encoding":
                codings += filter(None, (c.strip().lower() for c in value.split(b",")))
        if len(codings) > 1 and codings[-1] == b"chunked":
            # RFC 9112 §6.1: a coding we do not decode (gzip, chunked) is 501, not bytes the
            # application would take for the body. chunked not last: llhttp answers 400 (§6.3).
            self._fail(501, "the only transfer coding supported is 'Transfer-Encoding: chunked'")
        if hosts > 1:
            self._fail(400, "a request must not carry more than one host header")
        if hosts == 0 and http11:
            self._fail(400, "an HTTP/1.1 request must carry a host header")

    def _expect(self, expectation: bytes, http11: bool) -> None:
        if expectation == b"100-continue":
            if http11:  # RFC 9110 §10.1.1: an HTTP/1.0 client's 100-continue MUST be ignored
                self.expects_continue = True
        elif expectation:  # an empty Expect asks for nothing
            self._fail(417, "the only expectation supported is 'Expect: 100-continue'")

    def on_body(self, body: bytes) -> None:
        self.expects_continue = False
        self._body_bytes += len(body)
        if self._body_bytes > self.max_body_bytes:
            self._fail(413, self._too_large())
        self._body.append(body)

    def on_message_complete(self) -> None:
        parser = self._parser
        self._ready.append(
            Request(
                method=parser.get_method().decode("ascii"),
                target=self._target,
                http_version=parser.get_http_version(),
                headers=self._headers,
                body=b"".join(self._body),
                keep_alive=parser.should_keep_alive(),
            )
        )
        self._reset()

    def _request_line_read(self) -> None:
        if self.method is None:
            self.method = self._parser.get_method().decode("ascii")

    # -- limits ---------------------------------------------------------------------------

    def _count_header_bytes(self, n: int) -> None:
        self._header_bytes += n
        if self._header_bytes > self.max_header_bytes:
            self._fail(431, self._headers_too_large())

    def _headers_too_large(self) -> str:
        return f"request headers are larger than {self.max_header_bytes} bytes"

    def _too_large(self) -> str:
        return f"request body is larger than the limit of {self.max_body_bytes} bytes"

    def _fail(self, status: int, message: str) -> None:
        # raising inside a callback makes httptools stop and raise HttpParserCallbackError
        self._violation = self.make_violation(status, message)
        raise self._violation


# -- responses ------------------------------------------------------------------------------

_REASONS = {status.value: status.phrase.encode("ascii") for status in HTTPStatus}
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


def has_no_body(status: int) -> bool:
    """1xx, 204 and 304 responses end with their head (RFC 9110 §6.4.1, RFC 9112 §6.3)."""
    return status < 200 or status == 204 or status == 304


class _DateCache:
    """The ``date`` header, formatted once per second rather than once per response."""

    def __init__(self) -> None:
        self._second = -1
        self._value = b""

    def get(self) -> bytes:
        now = int(time.time())
        if now != self._second:
            self._second = now
            self._value = formatdate(now, usegmt=True).encode("ascii")
        return self._value


_date = _DateCache()


def response_head(
    status: int,
    headers: Headers,
    *,
    content_length: int | None,
    close: bool,
    http10: bool = False,
) -> bytes:
    """Status line and headers. ``content_length`` None means a chunked body follows.

    A status that has no body (``has_no_body``) gets no framing at all: ``content_length`` is
    ignored and the application's own ``content-length`` and ``transfer-encoding`` are dropped.

    ``http10``: the client speaks HTTP/1.0, which has no chunked coding (a body of unknown
    length then ends when the connection closes, so pass ``close``) and closes after the
    response unless told ``connection: keep-alive``.

    Header names and values come from our own code, but a CR or LF in one would let a value
    (an upstream's header, say) forge a response, so they are refused here, in one place.
    """
    parts = [b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, b"Unknown"))]
    bodiless = has_no_body(status)
    has_length = False
    for name, value in headers:
        if b"\r" in value or b"\n" in value or b"\r" in name or b"\n" in name:
            raise ValueError(f"header {name!r} contains CR or LF")
        lower = name.lower()
        if lower == b"content-length" and not bodiless:
            has_length = True
        elif lower in (b"connection", b"transfer-encoding", b"date", b"content-length"):
            continue  # framing is the server's business
        parts.append(b"%s: %s\r\n" % (name, value))
    if not has_length and not bodiless:
        if content_length is not None:
            parts.append(b"content-length: %d\r\n" % content_length)
        elif not http10:
            parts.append(b"transfer-encoding: chunked\r\n")
    if close:
        parts.append(b"connection: close\r\n")
    elif http10:
        parts.append(b"connection: keep-alive\r\n")
    parts.append(b"date: %s\r\n\r\n" % _date.get())
    return b"".join(parts)


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


LAST_CHUNK = b"0\r\n\r\n"


_ERROR_CODES = {
    400: "invalid_request",
    408: "request_timeout",
    413: "request_too_large",
    417: "expectation_failed",
    431: "headers_too_large",
    500: "internal_error",
    501: "not_implemented",
    503: "overloaded",
    505: "http_version_not_supported",
}


def error_response(
    status: int, message: str, *, request_id: str | None = None, extra: Headers | None = None
) -> bytes:
    """A whole OpenAI-shaped error response that closes the connection."""
    type_ = "invalid_request_error" if status < 500 else "server_error"
    body = error_body(message, type_, _ERROR_CODES.get(status))
    headers: Headers = [
        (b"content-type", b"application/json"),
        (b"x-request-id", request_id_from(request_id).encode("latin-1")),
        *(extra or []),
    ]
    return response_head(status, headers, content_length=len(body), close=True) + body
