"""The HTTP server's framing: keep-alive, pipelining and how responses are delimited.

Shared app, server and raw-socket client: tests/e2e/http_server_helpers.py.
"""

from __future__ import annotations

import pytest
import trio

from tests.e2e.http_server_helpers import BIG, App, get, post, serve

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
