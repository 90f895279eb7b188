"""The HTTP server's Expect: 100-continue handling, client disconnects and graceful shutdown.

Shared app, server and raw-socket client: tests/e2e/http_server_helpers.py.
"""

from __future__ import annotations

import logging

import pytest
import trio
import trio.testing

from tests.e2e.http_server_helpers import App, get, post, serve

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
