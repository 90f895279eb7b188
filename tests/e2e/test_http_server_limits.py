"""The HTTP server's limits and timeouts, its connection cap, and Host and version checks.

Shared app, server and raw-socket client: tests/e2e/http_server_helpers.py.
"""

from __future__ import annotations

import socket
import struct

import pytest
import trio
import trio.testing

from tests.e2e.http_server_helpers import App, get, post, serve

# -- limits and timeouts ------------------------------------------------------------------------


async def test_oversize_body_is_413_and_closed_before_the_app_runs(
    nursery: trio.Nursery,
) -> None:
    app = App()
    served = await serve(nursery, app, max_body_bytes=100)
    with trio.fail_after(5):
        client = await served.connect()
        await client.send(get("/echo", "content-length: 5000", "x-request-id: big-1",
                              method="POST") + b"x" * 50)
        response = await client.read_response()
        assert response.status == 413
        assert response.get("x-request-id") == "big-1"
        assert response.get("connection") == "close"
        assert response.json()["error"]["code"] == "request_too_large"
        assert await client.closed()

        chunked = await served.connect()
        await chunked.send(get("/echo", "transfer-encoding: chunked", method="POST"))
        for _ in range(3):
            await chunked.send(b"28\r\n" + b"y" * 40 + b"\r\n")  # 120 bytes > 100
        response = await chunked.read_response()
        assert response.status == 413
        assert await chunked.closed()
        assert app.calls == []


async def test_oversize_body_still_on_its_way_gets_the_413_and_a_clean_close(
    nursery: trio.Nursery,
) -> None:
    """The client is still sending its body when the 413 goes out. The server half-closes and
    drains before closing, so the client sees the answer, then EOF — not ECONNRESET, which is
    what closing a socket with unread bytes produces (and some clients then lose the answer)."""
    served = await serve(nursery, App(), max_body_bytes=1000)
    with trio.fail_after(10):
        client = await served.connect()
        await client.send(get("/echo", "content-length: 2000000", "x-request-id: big-2",
                              method="POST"))
        sent_all = trio.Event()

        async def keep_sending() -> None:
            for _ in range(8):  # 512 KiB: arrives after the 413, within the drain limit
                await client.send(b"z" * 65536)
                await trio.sleep(0.005)
            sent_all.set()

        nursery.start_soon(keep_sending)
        await sent_all.wait()
        response = await client.read_response()
        assert (response.status, response.get("x-request-id")) == (413, "big-2")
        assert client.buffer == b""
        assert await client.stream.receive_some(65536) == b""  # FIN, not a reset


async def test_oversize_headers_are_431(nursery: trio.Nursery) -> None:
    served = await serve(nursery, App(), max_header_bytes=1024)
    with trio.fail_after(5):
        client = await served.connect()
        await client.send(get("/echo", "x-request-id: hdr-1", "x-big: " + "v" * 2000))
        response = await client.read_response()
        assert (response.status, response.get("x-request-id")) == (431, "hdr-1")
        assert await client.closed()


async def test_idle_keep_alive_connection_is_closed_after_keep_alive_s(
    nursery: trio.Nursery,
) -> None:
    served = await serve(nursery, App(), keep_alive_s=0.2)
    with trio.fail_after(5):
        client = await served.connect()
        started = trio.current_time()  # before the server's idle clock can start
        await client.send(get("/echo"))
        assert (await client.read_response()).status == 200
        assert await client.closed()  # closed quietly: an idle connection owes no answer
        assert 0.2 <= trio.current_time() - started < 2
        await served.wait_for(0)


async def test_slow_partial_request_gets_408(nursery: trio.Nursery) -> None:
    app = App()
    served = await serve(nursery, app, keep_alive_s=10, request_read_s=0.2)
    with trio.fail_after(5):
        client = await served.connect()
        started = trio.current_time()
        await client.send(b"GET /echo HTTP/1.1\r\nhost: test\r\n")  # no blank line yet
        response = await client.read_response()
        assert response.status == 408
        assert response.json()["error"]["code"] == "request_timeout"
        assert 0.2 <= trio.current_time() - started < 2
        assert await client.closed()

        body = await served.connect()  # a body that stalls counts too
        await body.send(get("/echo", "content-length: 10", method="POST") + b"abc")
        assert (await body.read_response()).status == 408
        assert app.calls == []


async def test_connection_cap_refuses_with_503_then_recovers(nursery: trio.Nursery) -> None:
    app = App()
    served = await serve(nursery, app, max_connections=2)
    with trio.fail_after(5):
        busy, half = await served.connect(), await served.connect()
        await busy.send(get("/slow"))  # the application is running
        await app.entered.wait()
        await half.send(post("/echo?half", b"0123456789")[:-4])  # a request half received
        await trio.testing.wait_all_tasks_blocked()
        third = await served.connect()  # neither is idle: no room to make
        await third.send(get("/echo"))
        refused = await third.read_response()
        assert refused.status == 503
        assert refused.get("retry-after") == "1"
        assert refused.get("connection") == "close"
        assert refused.json()["error"]["code"] == "overloaded"
        assert await third.closed()
        assert served.server.statistics().refused_connections == 1

        await half.send(b"6789")  # neither was disturbed
        assert (await half.read_response()).body == b"POST /echo?half 0123456789"
        app.release.set()
        assert (await busy.read_response()).body == b"slow done"
        await busy.aclose()
        await served.wait_for(1)
        fourth = await served.connect()
        await fourth.send(get("/echo?fourth"))
        assert (await fourth.read_response()).body == b"GET /echo?fourth "
        await half.send(get("/echo?half"))  # room was made by busy's close: half was kept
        assert (await half.read_response()).status == 200
        assert served.server.statistics().refused_connections == 1


async def test_over_the_cap_a_late_request_gets_its_503_and_silence_is_closed_and_counted(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An over-cap connection whose request is not in the socket at accept waits (no task of
    its own) for the sweeper: a request that comes in time gets the 503; a connection that
    stays silent is closed unanswered and counted, so an operator sees those hang-ups."""
    from sbactor.http_server import _server

    monkeypatch.setattr(_server, "_REFUSAL_WAIT_S", 0.3)
    app = App()
    served = await serve(nursery, app, max_connections=1)
    with trio.fail_after(5):
        busy = await served.connect()
        await busy.send(get("/slow"))
        await app.entered.wait()
        late, silent = await served.connect(), await served.connect()
        await trio.sleep(0.1)  # both accepted and waiting for their request
        await late.send(get("/echo?late"))
        refused = await late.read_response()
        assert (refused.status, refused.get("connection")) == (503, "close")
        assert await late.closed()
        assert await silent.closed()  # after ~0.3 s with nothing sent: no answer, a close
        stats = served.server.statistics()
        assert (stats.refused_connections, stats.unanswered_refusals) == (2, 1)
        app.release.set()
        assert (await busy.read_response()).body == b"slow done"


async def test_at_the_cap_a_connection_idle_only_briefly_is_kept(nursery: trio.Nursery) -> None:
    """Under a storm every keep-alive connection is idle for a moment between requests; closing
    those would break clients already in. A newcomer gets the 503 until one has been idle for
    ``evict_idle_after_s``."""
    served = await serve(nursery, App(), max_connections=1, evict_idle_after_s=0.3)
    with trio.fail_after(5):
        regular = await served.connect()
        await regular.send(get("/echo"))
        assert (await regular.read_response()).status == 200
        newcomer = await served.connect()
        await newcomer.send(get("/echo?new"))
        refused = await newcomer.read_response()
        assert (refused.status, refused.get("retry-after")) == (503, "1")
        await regular.send(get("/echo?again"))  # the client already in is not disturbed
        assert (await regular.read_response()).status == 200
        await trio.sleep(0.35)  # now idle long enough to make room
        later = await served.connect()
        await later.send(get("/echo?later"))
        assert (await later.read_response()).status == 200
        assert await regular.closed()


async def test_at_the_cap_the_longest_idle_connection_makes_room(nursery: trio.Nursery) -> None:
    """Idle keep-alive connections (a client's pool) do not lock new clients out: at the cap,
    the connection idle the longest is closed for the new one, which is served, not 503."""
    served = await serve(nursery, App(), max_connections=2, evict_idle_after_s=0.0)
    with trio.fail_after(5):
        first, second = await served.connect(), await served.connect()
        for client in (second, first):  # first is used last: second has been idle longest
            await client.send(get("/echo"))
            assert (await client.read_response()).status == 200
        third = await served.connect()
        await third.send(get("/echo?third"))
        assert (await third.read_response()).body == b"GET /echo?third "
        assert await second.closed()  # closed quietly, between requests: it owed no answer
        await first.send(get("/echo?first"))  # the more recently used one was kept
        assert (await first.read_response()).body == b"GET /echo?first "
        stats = served.server.statistics()
        assert (stats.connections, stats.refused_connections) == (2, 0)

        never_spoke = await served.connect()  # at the cap again: third is the longest idle
        assert await third.closed()
        await served.wait_for(2)
        await trio.testing.wait_all_tasks_blocked()  # never_spoke waits for its request: idle
        fourth = await served.connect()
        await fourth.send(get("/echo?fourth"))
        assert (await fourth.read_response()).status == 200
        assert await first.closed()  # idle since its answer, before never_spoke was accepted
        assert served.server.statistics().refused_connections == 0
        await never_spoke.send(get("/echo?never"))  # a connection that never spoke yet is kept
        assert (await never_spoke.read_response()).status == 200


async def test_a_connection_reset_before_accept_does_not_stop_the_server(
    nursery: trio.Nursery,
) -> None:
    served = await serve(nursery, App())
    # blocking calls on purpose: no checkpoint, so the server cannot accept before the reset
    raw = socket.create_connection(("127.0.0.1", served.port))
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    raw.close()  # RST: the accepted socket has no peer any more (getpeername fails)
    with trio.fail_after(5):
        client = await served.connect()  # accepted after the reset one
        await client.send(get("/echo"))
        assert (await client.read_response()).status == 200
        assert not served.returned.is_set()


# -- Host (RFC 9112 §3.2) -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "head",
    [
        b"GET /echo HTTP/1.1\r\nx-request-id: host-1\r\n\r\n",
        b"GET /echo HTTP/1.1\r\nhost: a\r\nx-request-id: host-1\r\nhost: b\r\n\r\n",
        b"GET /echo HTTP/1.0\r\nhost: a\r\nx-request-id: host-1\r\nhost: a\r\n\r\n",
    ],
    ids=["missing", "two", "two-http10"],
)
async def test_missing_or_repeated_host_is_400(nursery: trio.Nursery, head: bytes) -> None:
    app = App()
    served = await serve(nursery, app)
    with trio.fail_after(5):
        client = await served.connect()
        await client.send(get("/echo?first") + head)  # the good request before it is served
        first, refused = await client.read_response(), await client.read_response()
        assert (first.status, first.body) == (200, b"GET /echo?first ")
        assert (refused.status, refused.get("x-request-id")) == (400, "host-1")
        assert refused.get("connection") == "close"
        error = refused.json()["error"]
        assert error["code"] == "invalid_request" and "host" in error["message"]
        assert await client.closed()
        assert app.calls == ["GET /echo"]


async def test_http10_without_host_is_served(nursery: trio.Nursery) -> None:
    served = await serve(nursery, App())
    with trio.fail_after(5):
        client = await served.connect()
        await client.send(b"GET /echo HTTP/1.0\r\n\r\n")
        assert (await client.read_response()).body == b"GET /echo? "


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"GET /echo\r\n\r\n", 505),  # HTTP/0.9, as llhttp reads it
        (get("/echo", "transfer-encoding: gzip, chunked", method="POST")
         + b"3\r\nabc\r\n0\r\n\r\n", 501),
    ],
    ids=["http09", "gzip-chunked"],
)
async def test_http09_is_505_and_a_coding_besides_chunked_is_501(
    nursery: trio.Nursery, raw: bytes, status: int
) -> None:
    app = App()
    served = await serve(nursery, app)
    with trio.fail_after(5):
        client = await served.connect()
        await client.send(raw)
        response = await client.read_response()
        assert response.status == status
        assert response.get("connection") == "close"
        assert await client.closed()
        assert app.calls == []


def test_the_open_files_limit_is_raised_toward_the_hard_limit() -> None:
    """The soft default (often 1,024) is below the connection cap's default; the server raises it
    as far as the hard limit allows, and says what it got. In a child: limits are per process."""
    import subprocess
    import sys

    script = """
import resource
from sbactor.http_server._server import raise_open_files_limit
resource.setrlimit(resource.RLIMIT_NOFILE, (300, 600))
print(raise_open_files_limit(450), resource.getrlimit(resource.RLIMIT_NOFILE)[0])
print(raise_open_files_limit(5000), resource.getrlimit(resource.RLIMIT_NOFILE)[0])
print(raise_open_files_limit(100), resource.getrlimit(resource.RLIMIT_NOFILE)[0])
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.split("\n")[:3] == ["450 450", "600 600", "600 600"]

    # a hard limit below the cap: the server warns with the numbers, and keeps a few pending
    sizing = """
import logging, resource
from sbactor.http_server._server import HttpServer, ServerLimits
logging.basicConfig(format="%(levelname)s %(message)s")
resource.setrlimit(resource.RLIMIT_NOFILE, (300, 600))
server = HttpServer(None, ServerLimits(max_connections=2048))
server._size_for_open_files()
print(server._max_pending)
"""
    out = subprocess.run([sys.executable, "-c", sizing], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "64"
    assert "WARNING open files limit 600 is below max_connections 2048 + 1024 spare" in out.stderr


def test_the_spare_descriptors_follow_the_provider_pools() -> None:
    """Pending refusals never take the descriptors the upstream pools may need."""
    from sbactor.config import parse_config
    from sbactor.server import http_server

    config = parse_config({
        "providers": [{"name": "a", "type": "openai", "base_url": "http://a/v1",
                       "max_connections": 100},
                      {"name": "b", "type": "openai", "base_url": "http://b/v1"}],
        "models": [{"name": "m", "deployments": [{"provider": "a"}, {"provider": "b"}]}],
        "server": {"request_read_s": 7},
    }, env={})
    server = http_server(config, app=None)  # type: ignore[arg-type]
    assert server.limits.reserved_fds == 256 + 100 + 256
    assert server.limits.request_read_s == 7


async def test_pending_refusals_are_closed_when_serving_is_cancelled(
    nursery: trio.Nursery,
) -> None:
    """Cancelled from outside (not shut down): over-cap sockets waiting for their request are
    closed, not leaked."""
    from sbactor.http_server import HttpServer, ServerLimits

    app = App()
    server = HttpServer(app, ServerLimits(max_connections=1))
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    cancel = trio.CancelScope()

    async def run(task_status: trio.TaskStatus[None]) -> None:
        with cancel:
            await server.serve(listeners, shutdown_trigger=trio.sleep_forever, grace_s=1,
                               task_status=task_status)

    await nursery.start(run)
    with trio.fail_after(5):
        busy = await trio.open_tcp_stream("127.0.0.1", port)
        await busy.send_all(get("/slow"))
        await app.entered.wait()
        silent = await trio.open_tcp_stream("127.0.0.1", port)
        while not server._pending_refusals:  # noqa: ASYNC110 (no event to wait on)
            await trio.sleep(0.01)
        cancel.cancel()
        assert await silent.receive_some(100) == b""  # closed
        assert not server._pending_refusals
