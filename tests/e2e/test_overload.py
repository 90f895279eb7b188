"""Load shedding by event-loop lag."""

from __future__ import annotations

import time

import trio
import trio.testing

from sbactor.overload import LoopLag
from tests.conftest import MockUpstream, StartGateway, mock_config


def _hog(seconds: float) -> None:
    """Keep the one trio thread busy, as a saturated gateway would be."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


async def test_lag_rises_when_the_loop_is_busy_and_falls_after(nursery: trio.Nursery) -> None:
    lag = LoopLag(interval_s=0.005, alpha=0.5)
    await nursery.start(lag.run)
    await trio.sleep(0.05)
    assert lag.lag_s < 0.02
    for _ in range(5):
        _hog(0.04)
        await trio.sleep(0)
    await trio.sleep(0.006)
    assert lag.lag_s > 0.01
    await trio.sleep(0.2)
    assert lag.lag_s < 0.01
    lag.stop()


async def test_a_lagging_gateway_sheds_new_requests_with_503(
    start_gateway: StartGateway, mock_upstream: MockUpstream
) -> None:
    cfg = mock_config(mock_upstream)
    cfg["server"] = {"auth": "off", "shed_loop_lag_ms": 250}
    gw = await start_gateway(cfg)
    assert (await gw.chat("hi")).status_code == 200
    gw.gateway.loop_lag.lag_s = 5.0  # as measured under saturation
    # below the floor (max_in_flight // 8, at least 4) requests are still served: they are
    # the goodput a storm of refusals must not starve
    assert gw.gateway.lag_shed_floor == 128
    assert (await gw.chat("hi")).status_code == 200
    gw.gateway.in_flight += 128  # as if 128 other requests were being served
    r = await gw.chat("hi")
    gw.gateway.in_flight -= 128
    assert r.status_code == 503
    assert r.json()["error"]["code"] == "overloaded"
    assert r.headers["retry-after"] == "1"
    assert len(mock_upstream.received()) == 2  # refused before any upstream call


async def test_overload_example_serves_and_refuses_past_the_connection_cap(
    start_gateway: StartGateway, mock_upstream: MockUpstream
) -> None:
    import attrs
    import openai
    import yaml

    from sbactor.config import parse_config
    from tests.conftest import REPO

    text = (REPO / "examples" / "overload-protection" / "sbactor.yaml").read_text()
    config = parse_config(yaml.safe_load(text), env={"MOCK_UPSTREAM_URL": mock_upstream.openai_base})
    assert (config.server.max_connections, config.server.max_in_flight) == (512, 128)
    # the same config with a cap small enough to reach in a test
    tight = attrs.evolve(config, server=attrs.evolve(config.server, max_connections=2))
    gw = await start_gateway(tight)
    host, port = gw.address.rsplit(":", 1)
    sdk = openai.AsyncOpenAI(base_url=f"http://{gw.address}/v1", api_key="none", max_retries=0)
    reply = await sdk.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hello"}]
    )
    assert reply.choices[0].message.content
    await sdk.close()
    await gw.client.aclose()  # its keep-alive connection would hold a slot

    request = b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n"
    with trio.fail_after(10):
        held = [await trio.open_tcp_stream(host, int(port)) for _ in range(2)]
        for stream in held:  # both are served: the cap counts them
            await stream.send_all(request)
            assert (await stream.receive_some(65536)).startswith(b"HTTP/1.1 200")
            await stream.send_all(request[:-2])  # a request begun: idle ones would make room
        await trio.testing.wait_all_tasks_blocked()
        third = await trio.open_tcp_stream(host, int(port))
        await third.send_all(request)
        answer = b""
        while chunk := await third.receive_some(65536):
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 503")
        assert b"retry-after: 1" in answer and b'"code":"overloaded"' in answer
        await held[0].aclose()
        while True:  # once the server has seen that close, the slot is free again
            again = await trio.open_tcp_stream(host, int(port))
            await again.send_all(request)
            if (await again.receive_some(65536)).startswith(b"HTTP/1.1 200"):
                break
            await again.aclose()
            await trio.sleep(0.01)
        for stream in [*held[1:], third, again]:
            await stream.aclose()
