"""Load shedding by event-loop lag."""

from __future__ import annotations

import time

import trio

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
    r = await gw.chat("hi")
    assert r.status_code == 503
    assert r.json()["error"]["code"] == "overloaded"
    assert r.headers["retry-after"] == "1"
    assert len(mock_upstream.received()) == 1  # refused before any upstream call
