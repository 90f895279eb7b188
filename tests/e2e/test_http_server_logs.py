"""The HTTP server's access log, and its statistics on the gateway's /metrics.

Shared app, server and raw-socket client: tests/e2e/http_server_helpers.py.
"""

from __future__ import annotations

import logging

import pytest
import trio
import trio.testing

from tests.conftest import MockUpstream, StartGateway, mock_config
from tests.e2e.http_server_helpers import (
    App,
    Client,
    Response,
    access_records,
    get,
    post,
    serve,
    wait_for_records,
)

# -- access log ---------------------------------------------------------------------------------


async def test_access_log_records_the_status_the_client_got(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="sbactor.access")
    served = await serve(nursery, App(), access_log=True)
    with trio.fail_after(5):
        client = await served.connect()
        await client.send(post("/echo?q=1", b"abc") + get("/stream") + get("/raise"))
        statuses = [(await client.read_response()).status for _ in range(3)]
        assert statuses == [200, 200, 500]
        records = await wait_for_records(caplog, 3)
    got = [(r.method, r.path, r.status) for r in records]  # type: ignore[attr-defined]
    assert got == [("POST", "/echo?q=1", 200), ("GET", "/stream", 200), ("GET", "/raise", 500)]
    assert all(r.getMessage().startswith(f"{r.method} ") for r in records)  # type: ignore[attr-defined]


NO_HOST = b"GET /nohost HTTP/1.1\r\n\r\n"
EXPECT_ODD = get("/echo", "content-length: 5", "expect: something-else", method="POST")


@pytest.mark.parametrize(
    ("raw", "status", "method", "path"),
    [
        (b"\x01\x02 not http\r\n\r\n", 400, "-", "-"),
        (NO_HOST, 400, "GET", "/nohost"),
        (get("/echo", "content-length: 5000", method="POST"), 413, "POST", "/echo"),
        (EXPECT_ODD, 417, "POST", "/echo"),
        (get("/echo", "x-big: " + "v" * 2000), 431, "GET", "/echo"),
        (get("/ws", "connection: upgrade", "upgrade: websocket"), 501, "GET", "/ws"),
        (b"GET /slow-client HTTP/1.1\r\nhost: test\r\nx-more: ", 408, "GET", "/slow-client"),
    ],
    ids=["400", "400-host", "413", "417", "431", "501", "408"],
)
async def test_access_log_records_server_made_errors(
    nursery: trio.Nursery,
    caplog: pytest.LogCaptureFixture,
    raw: bytes,
    status: int,
    method: str,
    path: str,
) -> None:
    caplog.set_level(logging.INFO, logger="sbactor.access")
    app = App()
    served = await serve(nursery, app, access_log=True, max_body_bytes=100,
                         max_header_bytes=1024, request_read_s=0.1)
    with trio.fail_after(5):
        client = await served.connect()
        await client.send(raw)
        response = await client.read_response()
        assert response.status == status
        [record] = await wait_for_records(caplog, 1)
    assert app.calls == []
    assert (record.method, record.path, record.status) == (method, path, status)  # type: ignore[attr-defined]
    assert record.bytes > 0 and record.duration_ms >= 0  # type: ignore[attr-defined]
    assert record.client == "127.0.0.1"  # type: ignore[attr-defined]
    assert record.getMessage() == f"{method} {path} {status}"


async def test_access_log_records_the_connection_cap_refusal(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="sbactor.access")
    served = await serve(nursery, App(), access_log=True, max_connections=1)
    with trio.fail_after(5):
        held = await served.connect()
        await held.send(get("/echo"))
        assert (await held.read_response()).status == 200
        await held.send(get("/echo?next")[:-2])  # a request begun: not idle, not closed for room
        await trio.testing.wait_all_tasks_blocked()
        refused = await served.connect()
        await refused.send(get("/echo?over"))
        assert (await refused.read_response()).status == 503
        records = await wait_for_records(caplog, 2)
    got = [(r.method, r.path, r.status) for r in records]  # type: ignore[attr-defined]
    assert got == [("GET", "/echo", 200), ("GET", "/echo?over", 503)]
    assert records[1].bytes > 0  # type: ignore[attr-defined]


async def test_gateway_access_log_one_record_per_request(
    start_gateway: StartGateway,
    mock_upstream: MockUpstream,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="sbactor.access")
    config = mock_config(mock_upstream, server={"auth": "off", "access_log": True})
    gw = await start_gateway(config)
    with trio.fail_after(10):
        assert (await gw.client.get("/healthz")).status_code == 200
        assert (await gw.chat("hello")).status_code == 200
        assert (await gw.client.get("/no/such/route")).status_code == 404
        records = await wait_for_records(caplog, 3)
        await trio.sleep(0.05)  # and no more than one each
    records = access_records(caplog)
    got = [(r.method, r.path, r.status) for r in records]  # type: ignore[attr-defined]
    assert got == [
        ("GET", "/healthz", 200),
        ("POST", "/v1/chat/completions", 200),
        ("GET", "/no/such/route", 404),
    ]
    assert all(r.duration_ms >= 0 and r.bytes > 0 for r in records)  # type: ignore[attr-defined]


async def test_access_log_off_by_default(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="sbactor.access")
    served = await serve(nursery, App())
    with trio.fail_after(5):
        client = await served.connect()
        await client.send(get("/echo"))
        assert (await client.read_response()).status == 200
        await trio.sleep(0.02)
    assert access_records(caplog) == []


# -- statistics on the gateway's /metrics -------------------------------------------------------


def scraped(response: Response, name: str) -> float:
    [value] = [
        float(line.rsplit(" ", 1)[1])
        for line in response.body.decode().splitlines()
        if line.startswith(name + " ")
    ]
    return value


async def test_gateway_metrics_show_connections_refusals_and_requests(
    start_gateway: StartGateway, mock_upstream: MockUpstream
) -> None:
    config = mock_config(mock_upstream, server={"auth": "off", "max_connections": 2})
    gw = await start_gateway(config)
    port = int(gw.address.rsplit(":", 1)[1])

    async def connect() -> Client:
        return Client(await trio.open_tcp_stream("127.0.0.1", port))

    with trio.fail_after(10):
        scraper = await connect()
        await scraper.send(get("/metrics"))
        before = await scraper.read_response()
        assert scraped(before, "sbactor_http_connections") == 1
        other = await connect()
        await other.send(get("/healthz"))
        assert (await other.read_response()).status == 200
        # requests begun on both: neither is idle, so neither is closed to make room
        await other.send(get("/healthz")[:-2])
        await scraper.send(get("/metrics")[:-2])
        await trio.testing.wait_all_tasks_blocked()
        over = await connect()  # a third connection: over the cap
        await over.send(get("/healthz"))
        assert (await over.read_response()).status == 503

        await scraper.send(b"\r\n")
        after = await scraper.read_response()
        assert scraped(after, "sbactor_http_connections") == 2
        assert (
            scraped(after, "sbactor_http_refused_connections_total")
            == scraped(before, "sbactor_http_refused_connections_total") + 1
        )
        assert (  # /healthz and this scrape; the refused request never reached the app
            scraped(after, "sbactor_http_requests_total")
            == scraped(before, "sbactor_http_requests_total") + 2
        )
        assert "# TYPE sbactor_http_requests_total counter" in after.body.decode()

        await other.aclose()
        while True:  # the gauge follows the close (no event tells when the server saw it)
            await scraper.send(get("/metrics"))
            if scraped(await scraper.read_response(), "sbactor_http_connections") == 1:
                break
            await trio.sleep(0.01)
