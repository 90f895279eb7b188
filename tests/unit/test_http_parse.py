"""The sans-I/O half of the HTTP server: ``RequestReader`` and the response encoders.

Everything here is bytes in, values out: no sockets, no trio. Requests are checked fed whole,
byte by byte and split at every offset, since TCP may cut a request anywhere.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Any

import attrs
import httptools
import pytest

from sbactor.http_server import ProtocolViolation, Request, RequestReader
from sbactor.http_server._parse import (
    CONTINUE,
    LAST_CHUNK,
    chunk,
    error_response,
    response_head,
)

MAX_HEADER = 1024
MAX_BODY = 64


def reader(*, max_header_bytes: int = MAX_HEADER, max_body_bytes: int = MAX_BODY) -> RequestReader:
    return RequestReader(max_header_bytes=max_header_bytes, max_body_bytes=max_body_bytes)


def drain(r: RequestReader) -> list[Request]:
    out = []
    while (request := r.next_request()) is not None:
        out.append(request)
    return out


def read_all(pieces: Iterable[bytes], **limits: int) -> list[Request]:
    r = reader(**limits)
    for piece in pieces:
        r.feed(piece)
    assert not r.in_progress
    return drain(r)


def as_tuple(request: Request) -> tuple[Any, ...]:
    return attrs.astuple(request, recurse=False)


def violation(pieces: Iterable[bytes], **limits: int) -> ProtocolViolation:
    r = reader(**limits)
    with pytest.raises(ProtocolViolation) as info:
        for piece in pieces:
            r.feed(piece)
    return info.value


def byte_by_byte(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


GET = b"GET /v1/models?x=1&y=%20 HTTP/1.1\r\nHost: gw\r\nX-Request-ID: abc-1\r\nAccept: */*\r\n\r\n"
POST = (
    b"POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\n"
    b"content-length: 18\r\n\r\n{\"model\": \"m\"}\r\n\r\n"
)
CHUNKED = (
    b"POST /v1/embeddings HTTP/1.1\r\nhost: gw\r\ntransfer-encoding: chunked\r\n\r\n"
    b"5\r\nhello\r\n1;ext=1\r\n,\r\n6\r\n world\r\n0\r\n\r\n"
)


# -- whole, byte by byte, any split -------------------------------------------------------------


@pytest.mark.parametrize("raw", [GET, POST, CHUNKED], ids=["get", "post", "chunked"])
def test_whole_and_byte_by_byte_give_the_same_request(raw: bytes) -> None:
    [whole] = read_all([raw])
    [bytewise] = read_all(byte_by_byte(raw))
    assert as_tuple(whole) == as_tuple(bytewise)


def test_request_fields() -> None:
    [request] = read_all([GET])
    assert request.method == "GET"
    assert request.target == b"/v1/models?x=1&y=%20"
    assert request.http_version == "1.1"
    assert request.headers == [(b"host", b"gw"), (b"x-request-id", b"abc-1"), (b"accept", b"*/*")]
    assert request.body == b""
    assert request.keep_alive is True
    [post] = read_all([POST])
    assert post.body == b'{"model": "m"}\r\n\r\n'  # the body is bytes, CRLFs and all


def test_pipelined_requests_come_out_in_order_at_any_split() -> None:
    batch = GET + POST + CHUNKED + GET.replace(b"/v1/models", b"/last")
    expected = [as_tuple(r) for r in read_all([batch])]
    assert [t[1] for t in expected] == [b"/v1/models?x=1&y=%20", b"/v1/chat/completions",
                                        b"/v1/embeddings", b"/last?x=1&y=%20"]
    for cut in range(1, len(batch)):
        got = [as_tuple(r) for r in read_all([batch[:cut], batch[cut:]])]
        assert got == expected, cut


def test_requests_wait_in_the_queue_until_taken() -> None:
    r = reader()
    r.feed(GET + POST[:30])
    assert r.has_request and r.in_progress  # the first is whole, the second has begun
    assert r.next_request() is not None
    assert not r.has_request and r.next_request() is None
    r.feed(POST[30:])
    assert r.has_request and not r.in_progress


# -- chunked bodies -----------------------------------------------------------------------------


def test_chunked_body_is_dechunked() -> None:
    [request] = read_all([CHUNKED])
    assert request.body == b"hello, world"
    assert (b"transfer-encoding", b"chunked") in request.headers


def test_chunk_trailers_are_not_merged_into_the_headers() -> None:
    raw = (
        b"POST / HTTP/1.1\r\nhost: gw\r\ntransfer-encoding: chunked\r\nx-request-id: real\r\n\r\n"
        b"3\r\nabc\r\n0\r\nx-request-id: forged\r\nauthorization: Bearer forged\r\n\r\n"
    )
    for pieces in ([raw], byte_by_byte(raw)):
        [request] = read_all(pieces)
        assert request.body == b"abc"
        assert request.headers == [
            (b"host", b"gw"), (b"transfer-encoding", b"chunked"), (b"x-request-id", b"real")
        ]


def test_chunked_body_at_the_limit_is_accepted() -> None:
    body = b"x" * MAX_BODY
    raw = b"POST / HTTP/1.1\r\nhost: gw\r\ntransfer-encoding: chunked\r\n\r\n" + b"".join(
        chunk(body[i : i + 10]) for i in range(0, MAX_BODY, 10)
    ) + LAST_CHUNK
    [request] = read_all([raw])
    assert request.body == body


def test_chunked_body_growing_past_the_limit_is_413() -> None:
    head = (
        b"POST / HTTP/1.1\r\nhost: gw\r\ntransfer-encoding: chunked\r\nx-request-id: big-1\r\n\r\n"
    )
    r = reader()
    r.feed(head)
    for _ in range(MAX_BODY // 16):
        r.feed(chunk(b"y" * 16))  # exactly the limit so far: fine
    with pytest.raises(ProtocolViolation) as info:
        r.feed(chunk(b"z"))
    assert info.value.status == 413
    assert info.value.request_id == "big-1"
    assert str(MAX_BODY) in info.value.message


# -- limits -------------------------------------------------------------------------------------


def test_header_block_over_the_limit_is_431() -> None:
    headers = b"".join(b"x-h%d: %s\r\n" % (i, b"v" * 40) for i in range(40))
    raw = b"GET / HTTP/1.1\r\nhost: gw\r\n" + headers + b"\r\n"
    for pieces in ([raw], byte_by_byte(raw)):
        err = violation(pieces)
        assert err.status == 431


def test_long_target_is_431() -> None:
    err = violation([b"GET /" + b"a" * (MAX_HEADER + 1) + b" HTTP/1.1\r\n\r\n"])
    assert err.status == 431


def test_headers_just_under_the_limit_are_accepted() -> None:
    # the counted size: target, plus name + value + 4 per header
    value = b"v" * (MAX_HEADER - len(b"/") - len(b"host") - len(b"gw") - 4 - len(b"x-big") - 4)
    head = b"GET / HTTP/1.1\r\nhost: gw\r\nx-big: "
    [request] = read_all([head + value + b"\r\n\r\n"])
    assert request.headers == [(b"host", b"gw"), (b"x-big", value)]
    assert violation([head + value + b"v\r\n\r\n"]).status == 431


def test_one_endless_header_value_is_cut_off_while_it_streams() -> None:
    """httptools buffers a header value until its line ends; the reader must not wait for it."""
    r = reader()
    r.feed(b"GET / HTTP/1.1\r\nhost: gw\r\nx-request-id: early\r\nx-endless: ")
    fed = 0
    with pytest.raises(ProtocolViolation) as info:
        while fed < 100 * MAX_HEADER:
            r.feed(b"a" * 100)
            fed += 100
    assert info.value.status == 431
    assert fed <= 3 * MAX_HEADER  # bounded by a small multiple of the limit, not the input
    assert info.value.request_id == "early"


def test_declared_content_length_over_the_limit_is_413_before_the_body() -> None:
    r = reader()
    with pytest.raises(ProtocolViolation) as info:
        r.feed(b"POST / HTTP/1.1\r\nhost: gw\r\ncontent-length: %d\r\n\r\n" % (MAX_BODY + 1))
    assert info.value.status == 413
    assert not r.has_request
    # exactly the limit is fine
    [request] = read_all([b"POST / HTTP/1.1\r\nhost: gw\r\ncontent-length: %d\r\n\r\n" % MAX_BODY
                          + b"b" * MAX_BODY])
    assert len(request.body) == MAX_BODY


@pytest.mark.parametrize("before", [True, False], ids=["id-first", "id-last"])
def test_x_request_id_is_carried_on_a_413_whatever_the_header_order(before: bool) -> None:
    headers = [b"content-length: 1000000\r\n", b"x-request-id: req-413\r\n"]
    if before:
        headers.reverse()
    err = violation([b"POST / HTTP/1.1\r\nhost: gw\r\n" + b"".join(headers) + b"\r\n"])
    assert (err.status, err.request_id) == (413, "req-413")


def test_x_request_id_is_carried_on_a_431_after_it_was_read() -> None:
    raw = (
        b"GET / HTTP/1.1\r\nhost: gw\r\nx-request-id: req-431\r\nx-big: "
        + b"v" * MAX_HEADER
        + b"\r\n\r\n"
    )
    err = violation([raw])
    assert (err.status, err.request_id) == (431, "req-431")


def test_x_request_id_is_carried_on_a_malformed_body() -> None:
    raw = (
        b"POST / HTTP/1.1\r\nhost: gw\r\nx-request-id: req-400\r\n"
        b"transfer-encoding: chunked\r\n\r\nzz\r\n"
    )
    err = violation([raw])
    assert (err.status, err.request_id) == (400, "req-400")


def test_no_request_id_before_headers_and_none_leaks_from_the_previous_request() -> None:
    r = reader()
    with pytest.raises(ProtocolViolation) as info:
        r.feed(GET + b"\x01\x02garbage\r\n\r\n")
    assert info.value.status == 400
    assert info.value.request_id is None  # GET's abc-1 belongs to GET, not to the garbage
    assert [req.target for req in drain(r)] == [b"/v1/models?x=1&y=%20"]  # GET is still served


# -- Host (RFC 9112 §3.2) -----------------------------------------------------------------------


def test_http11_request_without_host_is_400() -> None:
    raw = b"GET /v1/models HTTP/1.1\r\nx-request-id: nohost-1\r\n\r\n"
    for pieces in ([raw], byte_by_byte(raw)):
        err = violation(pieces)
        assert (err.status, err.request_id) == (400, "nohost-1")
        assert "host" in err.message
        assert (err.method, err.target) == ("GET", b"/v1/models")


def test_more_than_one_host_is_400_in_any_version() -> None:
    for version in (b"1.1", b"1.0"):
        err = violation([b"GET / HTTP/%s\r\nhost: a\r\nHost: b\r\n\r\n" % version])
        assert err.status == 400 and "host" in err.message


def test_http10_request_without_host_is_accepted() -> None:
    [request] = read_all([b"GET / HTTP/1.0\r\n\r\n"])
    assert request.http_version == "1.0" and request.headers == []


def test_request_without_host_behind_a_good_one_does_not_lose_the_good_one() -> None:
    r = reader()
    with pytest.raises(ProtocolViolation) as info:
        r.feed(GET + b"GET /second HTTP/1.1\r\n\r\n")
    assert info.value.status == 400
    assert [req.target for req in drain(r)] == [b"/v1/models?x=1&y=%20"]


# -- what a violation knows about its request ---------------------------------------------------


def test_violation_carries_the_request_line_once_it_was_read() -> None:
    err = violation([b"POST /v1/embeddings HTTP/1.1\r\nhost: gw\r\ncontent-length: 999\r\n\r\n"])
    assert (err.status, err.method, err.target) == (413, "POST", b"/v1/embeddings")
    garbage = violation([b"\x01\x02 not http\r\n\r\n"])
    assert (garbage.method, garbage.target) == (None, None)
    long_target = violation([b"GET /" + b"a" * (MAX_HEADER + 1)])  # the line never finished
    assert (long_target.status, long_target.method, long_target.target) == (431, None, None)


def test_make_violation_describes_the_request_in_progress() -> None:
    r = reader()
    r.feed(b"GET /slow HTTP/1.1\r\nhost: gw\r\nx-request-id: slow-1\r\nx-more")
    err = r.make_violation(408, "too slow")
    assert (err.status, err.request_id, err.method, err.target) == (
        408, "slow-1", "GET", b"/slow"
    )
    idle = reader()
    assert idle.make_violation(408, "x").method is None


# -- malformed input ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # a TLS ClientHello on the plain port
        b"HELLO\r\n\r\n",
        b"GET / HTTP/1.1\r\nhost: gw\r\nbad header: x\r\n\r\n",
        b"GET / HTTP/1.1\r\nhost: gw\r\nx-h: a\rb\r\n\r\n",
        b"GET / HTTP/1.1\nhost: x\n\n",  # bare LF line endings
        b"GET / HTTP/1.1\r\nhost: x\r\n folded\r\n\r\n",  # obsolete line folding
        b"GET /\x7f HTTP/1.1\r\n\r\n",
        b"GET / HTTP/3.0\r\n\r\n",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",  # HTTP/2 prior knowledge
        # request smuggling shapes
        b"POST / HTTP/1.1\r\nhost: gw\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n"
        b"0\r\n\r\n",
        b"POST / HTTP/1.1\r\nhost: gw\r\ncontent-length: 3\r\ncontent-length: 4\r\n\r\nabcd",
        b"POST / HTTP/1.1\r\nhost: gw\r\ncontent-length: -1\r\n\r\n",
        b"POST / HTTP/1.1\r\nhost: gw\r\ncontent-length: 99999999999999999999999\r\n\r\n",
        b"POST / HTTP/1.1\r\nhost: gw\r\ntransfer-encoding: gzip\r\n\r\nabc",
        b"POST / HTTP/1.1\r\nhost: gw\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nabc\r\n",
        b"POST / HTTP/1.1\r\nhost: gw\r\ntransfer-encoding: chunked\r\n\r\n"
        b"3\r\nabcdef\r\n0\r\n\r\n",
    ],
)
def test_garbage_is_400(raw: bytes) -> None:
    for pieces in ([raw], byte_by_byte(raw)):
        err = violation(pieces)
        assert err.status == 400, err.message
        assert err.message.startswith("malformed HTTP request")


@pytest.mark.parametrize(
    "raw",
    [
        b"GET /ws HTTP/1.1\r\nhost: gw\r\nconnection: Upgrade\r\nupgrade: websocket\r\n\r\n",
        b"GET / HTTP/1.1\r\nhost: gw\r\nconnection: upgrade, keep-alive\r\nupgrade: h2c\r\n\r\n",
        b"CONNECT api.example.com:443 HTTP/1.1\r\nhost: api.example.com:443\r\n\r\n",
    ],
    ids=["websocket", "h2c", "connect"],
)
def test_upgrade_is_501_and_the_upgrade_request_is_not_queued(raw: bytes) -> None:
    r = reader()
    with pytest.raises(ProtocolViolation) as info:
        r.feed(GET + raw.replace(b"\r\n\r\n", b"\r\nx-request-id: up-9\r\n\r\n"))
    assert (info.value.status, info.value.request_id) == (501, "up-9")
    # the GET before it is served; the upgrade request itself never reaches the application
    assert [req.method for req in drain(r)] == ["GET"]


# -- HTTP versions and transfer codings ---------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "version"),
    [
        (b"GET /\r\n\r\n", "0.9"),  # no version: llhttp takes it for HTTP/0.9
        (b"GET / HTTP/0.9\r\nhost: gw\r\n\r\n", "0.9"),
        (b"GET / HTTP/2.0\r\nhost: gw\r\n\r\n", "2.0"),  # llhttp parses 2.0 like 1.1
    ],
    ids=["bare-request-line", "0.9", "2.0"],
)
def test_http_versions_but_10_and_11_are_505(raw: bytes, version: str) -> None:
    for pieces in ([raw], byte_by_byte(raw)):
        err = violation(pieces)
        assert err.status == 505, err.message
        assert f"HTTP/{version}" in err.message
    r = reader()
    with pytest.raises(ProtocolViolation):
        r.feed(GET + raw)
    assert [req.http_version for req in drain(r)] == ["1.1"]  # the request before it is kept


@pytest.mark.parametrize(
    "codings",
    [[b"gzip, chunked"], [b"gzip", b"chunked"], [b"deflate,chunked"], [b"identity, chunked"]],
)
def test_a_transfer_coding_besides_chunked_is_501(codings: list[bytes]) -> None:
    """RFC 9112 §6.1: the body would reach the application still gzip-coded."""
    te = b"".join(b"transfer-encoding: %s\r\n" % coding for coding in codings)
    raw = b"POST / HTTP/1.1\r\nhost: gw\r\nx-request-id: te-1\r\n" + te + b"\r\n"
    for pieces in ([raw + b"3\r\nabc\r\n0\r\n\r\n"], byte_by_byte(raw)):
        err = violation(pieces)
        assert (err.status, err.request_id) == (501, "te-1")


@pytest.mark.parametrize("value", [b"chunked", b"Chunked ", b", chunked"])
def test_chunked_alone_is_read(value: bytes) -> None:
    raw = b"POST / HTTP/1.1\r\nhost: gw\r\ntransfer-encoding: %s\r\n\r\n" % value
    [request] = read_all([raw + b"3\r\nabc\r\n0\r\n\r\n"])
    assert request.body == b"abc"


# -- Expect: 100-continue -----------------------------------------------------------------------


def test_expect_continue_is_set_until_body_bytes_arrive() -> None:
    r = reader()
    r.feed(b"POST / HTTP/1.1\r\nhost: gw\r\ncontent-length: 4\r\nExpect: 100-Continue\r\n\r\n")
    assert r.expects_continue and r.in_progress and not r.has_request
    r.feed(b"ab")
    assert not r.expects_continue
    r.feed(b"cd")
    assert not r.expects_continue
    [request] = drain(r)
    assert request.body == b"abcd"


def test_expect_continue_with_the_body_in_the_same_feed_is_not_set() -> None:
    r = reader()
    r.feed(b"POST / HTTP/1.1\r\nhost: gw\r\ncontent-length: 2\r\nexpect: 100-continue\r\n\r\nok")
    assert not r.expects_continue and r.has_request


def test_expect_continue_with_a_chunked_body() -> None:
    r = reader()
    r.feed(
        b"POST / HTTP/1.1\r\nhost: gw\r\ntransfer-encoding: chunked\r\n"
        b"expect: 100-continue\r\n\r\n"
    )
    assert r.expects_continue
    r.feed(b"2\r\nhi\r\n0\r\n\r\n")
    assert not r.expects_continue
    assert drain(r)[0].body == b"hi"


def test_expect_continue_on_an_oversize_body_is_413_not_continue() -> None:
    r = reader()
    with pytest.raises(ProtocolViolation) as info:
        r.feed(
            b"POST / HTTP/1.1\r\nhost: gw\r\ncontent-length: 1000\r\n"
            b"expect: 100-continue\r\n\r\n"
        )
    assert info.value.status == 413


def test_no_expect_no_continue() -> None:
    r = reader()
    r.feed(b"POST / HTTP/1.1\r\nhost: gw\r\ncontent-length: 2\r\n\r\n")
    assert not r.expects_continue and r.in_progress


def test_expect_continue_from_an_http10_client_is_ignored() -> None:
    """RFC 9110 §10.1.1: a 100-continue expectation in an HTTP/1.0 request MUST be ignored."""
    r = reader()
    r.feed(b"POST / HTTP/1.0\r\ncontent-length: 2\r\nexpect: 100-continue\r\n\r\n")
    assert not r.expects_continue and r.in_progress
    r.feed(b"ok")
    assert drain(r)[0].body == b"ok"


@pytest.mark.parametrize("version", [b"1.1", b"1.0"])
@pytest.mark.parametrize("value", [b"something-else", b"100-continue, x", b"200-ok"])
def test_unknown_expectation_is_417(version: bytes, value: bytes) -> None:
    raw = (
        b"POST /up HTTP/%s\r\nhost: gw\r\nx-request-id: exp-1\r\ncontent-length: 2\r\n"
        b"expect: %s\r\n\r\n" % (version, value)
    )
    for pieces in ([raw], byte_by_byte(raw)):
        err = violation(pieces)
        assert (err.status, err.request_id, err.method) == (417, "exp-1", "POST")


# -- keep-alive ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("version", "connection", "keep_alive"),
    [
        (b"1.1", None, True),
        (b"1.1", b"close", False),
        (b"1.1", b"Close", False),
        (b"1.1", b"keep-alive", True),
        (b"1.0", None, False),
        (b"1.0", b"keep-alive", True),
        (b"1.0", b"Keep-Alive", True),
        (b"1.0", b"close", False),
    ],
)
def test_keep_alive(version: bytes, connection: bytes | None, keep_alive: bool) -> None:
    header = b"connection: %s\r\n" % connection if connection else b""
    [request] = read_all([b"GET / HTTP/%s\r\nhost: x\r\n%s\r\n" % (version, header)])
    assert request.http_version == version.decode()
    assert request.keep_alive is keep_alive


# -- response heads -----------------------------------------------------------------------------


@attrs.frozen
class Parsed:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    complete: bool

    def get(self, name: bytes) -> list[bytes]:
        return [v for n, v in self.headers if n == name]


def parse_response(raw: bytes) -> Parsed:
    """Parse with a real HTTP parser (llhttp), so the framing is checked, not only the text."""

    @attrs.define
    class Collect:
        headers: list[tuple[bytes, bytes]] = attrs.Factory(list)
        body: bytes = b""
        complete: bool = False

        def on_header(self, name: bytes, value: bytes) -> None:
            self.headers.append((name.lower(), value))

        def on_body(self, body: bytes) -> None:
            self.body += body

        def on_message_complete(self) -> None:
            self.complete = True

    collect = Collect()
    parser = httptools.HttpResponseParser(collect)
    parser.feed_data(raw)
    return Parsed(parser.get_status_code(), collect.headers, collect.body, collect.complete)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        (b"x-up", b"ok\r\nset-cookie: forged=1"),
        (b"x-up", b"ok\nx-forged: 1"),
        (b"x-up", b"ok\r"),
        (b"x-up\r\nx-forged", b"1"),
        (b"x-up\n", b"1"),
    ],
)
def test_response_head_refuses_cr_and_lf(name: bytes, value: bytes) -> None:
    with pytest.raises(ValueError, match="CR or LF"):
        response_head(200, [(name, value)], content_length=0, close=False)


def test_response_head_with_content_length() -> None:
    head = response_head(200, [(b"content-type", b"application/json")], content_length=5,
                         close=False)
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and head.endswith(b"\r\n\r\n")
    parsed = parse_response(head + b"hello")
    assert parsed.complete and parsed.body == b"hello"
    assert parsed.get(b"content-length") == [b"5"]
    assert parsed.get(b"transfer-encoding") == []
    assert parsed.get(b"connection") == []
    assert len(parsed.get(b"date")) == 1


def test_response_head_chunked() -> None:
    head = response_head(200, [(b"content-type", b"text/event-stream")], content_length=None,
                         close=False)
    parsed = parse_response(head + chunk(b"data: 1\n\n") + chunk(b"x") + LAST_CHUNK)
    assert parsed.complete and parsed.body == b"data: 1\n\nx"
    assert parsed.get(b"transfer-encoding") == [b"chunked"]
    assert parsed.get(b"content-length") == []


def test_application_content_length_wins_and_is_not_duplicated() -> None:
    for content_length in (None, 3):
        head = response_head(200, [(b"Content-Length", b"3")], content_length=content_length,
                             close=False)
        parsed = parse_response(head + b"abc")
        assert parsed.get(b"content-length") == [b"3"]
        assert parsed.get(b"transfer-encoding") == []
        assert parsed.complete and parsed.body == b"abc"


def test_server_owned_headers_from_the_application_are_dropped() -> None:
    app_headers = [
        (b"Connection", b"keep-alive, Upgrade"),
        (b"transfer-encoding", b"identity"),
        (b"TRANSFER-ENCODING", b"chunked"),
        (b"Date", b"Mon, 01 Jan 1990 00:00:00 GMT"),
        (b"x-kept", b"1"),
    ]
    for close in (False, True):
        parsed = parse_response(
            response_head(200, app_headers, content_length=2, close=close) + b"ok"
        )
        assert parsed.get(b"connection") == ([b"close"] if close else [])
        assert parsed.get(b"transfer-encoding") == []
        [date] = parsed.get(b"date")
        assert b"1990" not in date and date.endswith(b" GMT")
        assert parsed.get(b"x-kept") == [b"1"]
        assert parsed.body == b"ok"


@pytest.mark.parametrize("status", [204, 304])
def test_no_content_and_not_modified_have_no_framing_headers(status: int) -> None:
    """RFC 9110 §15.3.5/§15.4.5, RFC 9112 §6.3: these responses end with their head."""
    app_headers = [(b"Content-Length", b"12"), (b"transfer-encoding", b"chunked"), (b"etag", b"x")]
    for content_length in (None, 0, 12):
        for http10 in (False, True):
            head = response_head(
                status, app_headers, content_length=content_length, close=False, http10=http10
            )
            lowered = head.lower()
            assert b"content-length" not in lowered and b"transfer-encoding" not in lowered
            assert b"etag: x\r\n" in head
            parsed = parse_response(head)
            assert parsed.status == status and parsed.complete and parsed.body == b""


def test_response_head_for_http10() -> None:
    keep = parse_response(response_head(200, [], content_length=2, close=False, http10=True))
    assert keep.get(b"connection") == [b"keep-alive"]
    streamed = response_head(200, [], content_length=None, close=True, http10=True)
    assert b"transfer-encoding" not in streamed.lower()
    assert b"content-length" not in streamed.lower()
    assert b"connection: close\r\n" in streamed


def test_status_line_reason_phrases() -> None:
    assert response_head(404, [], content_length=0, close=False).startswith(
        b"HTTP/1.1 404 Not Found\r\n"
    )
    assert response_head(599, [], content_length=0, close=False).startswith(
        b"HTTP/1.1 599 Unknown\r\n"
    )


def test_chunk_encoding() -> None:
    assert chunk(b"a" * 26) == b"1a\r\n" + b"a" * 26 + b"\r\n"
    assert LAST_CHUNK == b"0\r\n\r\n"
    assert CONTINUE == b"HTTP/1.1 100 Continue\r\n\r\n"


# -- error responses ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "type_", "code"),
    [
        (400, "invalid_request_error", "invalid_request"),
        (408, "invalid_request_error", "request_timeout"),
        (413, "invalid_request_error", "request_too_large"),
        (417, "invalid_request_error", "expectation_failed"),
        (431, "invalid_request_error", "headers_too_large"),
        (500, "server_error", "internal_error"),
        (501, "server_error", "not_implemented"),
        (503, "server_error", "overloaded"),
        (505, "server_error", "http_version_not_supported"),
    ],
)
def test_error_response_shape(status: int, type_: str, code: str) -> None:
    raw = error_response(status, "went wrong", request_id="req-7")
    parsed = parse_response(raw)
    assert parsed.status == status and parsed.complete
    assert parsed.get(b"content-type") == [b"application/json"]
    assert parsed.get(b"x-request-id") == [b"req-7"]
    assert parsed.get(b"connection") == [b"close"]
    assert parsed.get(b"content-length") == [str(len(parsed.body)).encode()]
    assert json.loads(parsed.body) == {
        "error": {"message": "went wrong", "type": type_, "code": code, "param": None}
    }


@pytest.mark.parametrize("request_id", [None, "", "bad id with spaces", "x" * 200, "a\r\nb: c"])
def test_error_response_makes_up_a_request_id_when_the_clients_is_unusable(
    request_id: str | None,
) -> None:
    [first] = parse_response(error_response(400, "no", request_id=request_id)).get(b"x-request-id")
    [second] = parse_response(error_response(400, "no", request_id=request_id)).get(b"x-request-id")
    assert first != second  # made up each time, never the client's unusable value
    assert re.fullmatch(rb"[A-Za-z0-9._:\-]{1,128}", first)


def test_error_response_extra_headers() -> None:
    parsed = parse_response(error_response(503, "busy", extra=[(b"retry-after", b"1")]))
    assert parsed.get(b"retry-after") == [b"1"]
    assert parsed.get(b"connection") == [b"close"]
