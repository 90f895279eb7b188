"""Operational endpoints, real gateway: /admin/actors and its key, /metrics, /healthz, /readyz."""

from __future__ import annotations

import re
from typing import Any

import httpx2
import pytest
import trio

from tests.conftest import MockUpstream, RunningGateway, StartGateway, mock_config

ADMIN_KEY = "adm-0123456789"
SEED = "33" * 32
ACTORS = ["ledger", "usage_jsonl", "feedback_store", "budget", "verdict_cache"]


def full_config(upstream: MockUpstream, **server: Any) -> dict[str, Any]:
    return mock_config(
        upstream,
        server={"auth": "off", **server},
        usage_sinks=[{"type": "ledger", "path": "ledger", "signing_seed_hex": SEED},
                     {"type": "jsonl", "path": "usage.jsonl"}],
        budgets=[{"scope": "global", "window": "day", "max_cost_usd": 100}],
        guardrails={"input": [{"type": "pii"}], "mesh": {"cache": True}},
    )


async def actors(gw: RunningGateway, **headers: str) -> dict[str, dict[str, Any]]:
    r = await gw.client.get("/admin/actors", headers=headers)
    assert r.status_code == 200, r.text
    return {a["name"]: a for a in r.json()["actors"]}


async def test_admin_actors_lists_actors_with_live_numbers(
    start_gateway: StartGateway, mock_upstream: MockUpstream
) -> None:
    gw = await start_gateway(full_config(mock_upstream))
    before = await actors(gw)
    assert list(before) == ACTORS  # the ledger starts first (and stops last)
    for name, stats in before.items():
        assert stats["running"] is True, name
        assert stats["capacity"] >= 1
        assert stats["errors"] == 0 and stats["last_error"] is None
        assert stats["supervision"] in ("restart", "escalate")
        for key in ("depth", "peak_depth", "blocked_senders", "processed", "uptime_s", "state"):
            assert key in stats, (name, key)
    assert before["ledger"]["supervision"] == "escalate"  # the ledger fails closed
    assert before["feedback_store"]["supervision"] == "restart"
    assert before["ledger"]["state"]["entries"] == 0

    for i in range(3):
        r = await gw.chat(f"hello {i}")
        assert r.status_code == 200, r.text
    r = await gw.chat("hello 0")  # the same prompt again: a verdict cache hit
    assert r.status_code == 200

    # the usage event is delivered after the response: poll until the ledger has it
    after = await _settled(gw, lambda a: a["ledger"]["state"]["entries"] >= 4)
    assert after["ledger"]["state"]["entries"] == 4
    assert after["ledger"]["processed"] > before["ledger"]["processed"]
    assert after["usage_jsonl"]["processed"] >= 4
    assert after["feedback_store"]["processed"] > before["feedback_store"]["processed"]
    assert after["budget"]["processed"] > before["budget"]["processed"]
    cache = after["verdict_cache"]["state"]
    assert cache["hits"] >= 1 and cache["misses"] >= 3
    assert after["verdict_cache"]["uptime_s"] >= before["verdict_cache"]["uptime_s"]


async def _settled(gw: RunningGateway, done: Any) -> dict[str, dict[str, Any]]:
    with trio.fail_after(10):
        while True:
            current = await actors(gw)
            if done(current):
                return current
            await trio.sleep(0.01)


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({}, 401),
        ({"authorization": "Bearer wrong"}, 401),
        ({"x-admin-key": "wrong"}, 401),
        ({"authorization": f"Basic {ADMIN_KEY}"}, 401),
        ({"authorization": f"Bearer {ADMIN_KEY}"}, 200),
        ({"x-admin-key": ADMIN_KEY}, 200),
    ],
)
async def test_admin_key_enforced(
    start_gateway: StartGateway, mock_upstream: MockUpstream, headers: dict[str, str],
    status: int,
) -> None:
    gw = await start_gateway(full_config(mock_upstream, admin_key=ADMIN_KEY))
    for route in ("/admin/actors", "/admin/budgets", "/admin/routing"):
        r = await gw.client.get(route, headers=headers)
        assert r.status_code == status, (route, r.text)
        if status == 401:
            assert r.json()["error"]["code"] == "invalid_admin_key"
            assert "x-request-id" in r.headers
    # operational probes stay open: orchestrators do not hold the admin key
    for route in ("/healthz", "/readyz", "/metrics"):
        assert (await gw.client.get(route)).status_code == 200


async def test_admin_open_without_a_configured_key(
    start_gateway: StartGateway, mock_upstream: MockUpstream
) -> None:
    gw = await start_gateway(full_config(mock_upstream))
    assert (await gw.client.get("/admin/actors")).status_code == 200


def metric(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample in Prometheus text format (None if absent)."""
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        m = re.match(r"^([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)$", line)
        if not m or m.group(1) != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        if found == labels:
            return float(m.group(3))
    return None


async def test_metrics_requests_latency_and_actors(
    start_gateway: StartGateway, mock_upstream: MockUpstream
) -> None:
    gw = await start_gateway(full_config(mock_upstream))
    for _ in range(2):
        assert (await gw.chat("hi")).status_code == 200
    assert (await gw.chat("hi", model="nope")).status_code == 404
    assert (await gw.client.get("/no/such/route")).status_code == 404
    await _settled(gw, lambda a: a["ledger"]["state"]["entries"] >= 2)
    r = await gw.client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    text = r.text
    route = "/v1/chat/completions"
    assert metric(text, "sbactor_requests_total", route=route, status="200") == 2
    assert metric(text, "sbactor_requests_total", route=route, status="404") == 1
    assert metric(text, "sbactor_requests_total", route="unmatched", status="404") == 1
    assert metric(text, "sbactor_request_duration_seconds_count", route=route, status="200") == 2
    assert metric(text, "sbactor_request_duration_seconds_bucket", route=route, status="200",
                  le="+Inf") == 2
    assert (metric(text, "sbactor_request_duration_seconds_sum", route=route, status="200")
            or 0) > 0
    for name in ACTORS:
        assert metric(text, "sbactor_actor_mailbox_depth", actor=name) is not None, name
        assert metric(text, "sbactor_actor_errors_total", actor=name) == 0, name
        assert metric(text, "sbactor_actor_mailbox_capacity", actor=name), name
    assert (metric(text, "sbactor_actor_processed_total", actor="ledger") or 0) >= 2


async def test_healthz_and_readyz_while_draining(
    start_gateway: StartGateway, mock_upstream: MockUpstream
) -> None:
    gw = await start_gateway(full_config(mock_upstream))
    r = await gw.client.get("/healthz")
    assert (r.status_code, r.json()) == (200, {"status": "ok"})
    r = await gw.client.get("/readyz")
    assert (r.status_code, r.json()) == (200, {"ready": True})
    # what the signal watcher does on SIGTERM (the subprocess cannot be asked: it stops accepting)
    gw.gateway.draining = True
    r = await gw.client.get("/readyz")
    assert r.status_code == 503
    assert r.json() == {"ready": False, "reasons": ["draining"]}
    r = await gw.client.get("/healthz")
    assert r.status_code == 200  # alive, just not taking new work
    r = await gw.chat("new work while draining")
    assert r.status_code == 503
    assert r.json()["error"]["code"] == "draining"


async def test_readyz_reports_a_stopped_actor(
    start_gateway: StartGateway, mock_upstream: MockUpstream
) -> None:
    gw = await start_gateway(full_config(mock_upstream))
    assert gw.gateway.verdict_cache is not None
    await gw.gateway.verdict_cache.stop()
    r = await gw.client.get("/readyz")
    assert r.status_code == 503
    assert "actor verdict_cache is not running" in r.json()["reasons"]


async def test_request_ids_on_operational_endpoints(
    start_gateway: StartGateway, mock_upstream: MockUpstream
) -> None:
    gw = await start_gateway(full_config(mock_upstream))
    r = await gw.client.get("/healthz", headers={"x-request-id": "probe-1"})
    assert r.headers["x-request-id"] == "probe-1"
    r = await gw.client.get("/healthz", headers={"x-request-id": "bad id with spaces"})
    assert re.fullmatch(r"[0-9a-f]{32}", r.headers["x-request-id"])  # replaced, not echoed
    assert isinstance(gw.client, httpx2.AsyncClient)
