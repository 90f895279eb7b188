"""Scale-out: two gateway instances (separate actors) sharing one real redis-server.

The redis fixture starts ``redis-server`` from PATH on a free loopback port (no persistence) and
stops it afterwards. Without redis-server the tests skip — except in CI (env ``CI`` set), where a
missing redis-server is a failure: .ci/run installs it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import attrs
import httpx2
import pytest
import trio
import yaml

from sbactor.config import ConfigError, hash_key, parse_config
from sbactor.ledger.verify import chain_dirs, verify
from tests.conftest import REPO, MockUpstream, RunningGateway, StartGateway, StartMock, mock_config

KEY_A, KEY_B = "sk-alpha", "sk-beta"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@attrs.define(eq=False)
class RedisServer:
    port: int
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        with trio.fail_after(10):
            while True:
                try:
                    await trio.open_tcp_stream("127.0.0.1", self.port)
                    return
                except OSError:
                    await trio.sleep(0.02)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()
        self.proc = None

    def cli(self, *args: str) -> str:
        out = subprocess.run(["redis-cli", "-p", str(self.port), *args], capture_output=True,
                             text=True, check=True)
        return out.stdout.strip()


@pytest.fixture
async def redis() -> Any:
    if shutil.which("redis-server") is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server is not installed (CI must install it: see .ci/run)")
        pytest.skip("redis-server not on PATH (apt-get install redis-server)")
    server = RedisServer(_free_port())
    await server.start()
    yield server
    if server.proc is not None:
        server.kill()


def shared_config(upstream: MockUpstream, redis: RedisServer, prefix: str,
                  **sections: Any) -> dict[str, Any]:
    state = {"backend": "redis", "url": redis.url, "key_prefix": prefix, "timeout_s": 0.5,
             "local_cache_s": 0.05, **sections.pop("state", {})}
    return mock_config(upstream, state=state, **sections)


async def _poll(predicate: Any, what: str) -> None:
    with trio.fail_after(10):
        while not predicate():
            await trio.sleep(0.02)
    assert predicate(), what


async def _usage(gw: RunningGateway, name: str = "usage.jsonl") -> list[dict[str, Any]]:
    path = gw.data_dir / name
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---- config -------------------------------------------------------------------------------------


def test_config_rules() -> None:
    base = {"providers": [{"name": "p", "type": "mock"}],
            "models": [{"name": "m", "deployments": [{"provider": "p"}]}]}
    cfg = parse_config({**base, "state": {"backend": "redis", "url": "redis://h:1/0",
                                          "on_unavailable": "fail_open"}}, env={})
    assert cfg.state.backend == "redis" and cfg.state.on_unavailable == "fail_open"
    with pytest.raises(ConfigError, match=r"server\.workers"):
        parse_config({**base, "server": {"workers": 2}}, env={})
    with pytest.raises(ConfigError, match=r"state\.url"):
        parse_config({**base, "state": {"backend": "redis", "url": "http://x"}}, env={})
    with pytest.raises(ConfigError, match=r"budgets\[0\].rolling"):
        parse_config({**base, "state": {"backend": "redis"},
                      "budgets": [{"scope": "global", "rolling": True, "window": "day",
                                   "max_cost_usd": 1}]}, env={})


# ---- budgets and rate limits across instances ---------------------------------------------------


async def test_two_instances_share_one_budget_cap_without_overshoot(
    start_mock: StartMock, start_gateway: StartGateway, redis: RedisServer
) -> None:
    upstream = await start_mock()
    cap = 0.002  # each request reserves its worst case (~0.0001 USD): about 20 fit
    cfg = shared_config(upstream, redis, "cap:", budgets=[
        {"scope": "global", "window": "day", "max_cost_usd": cap}])
    a, b = await start_gateway(cfg), await start_gateway(cfg)
    statuses: list[int] = []
    costs: list[float] = []

    async def one(gw: RunningGateway, i: int) -> None:
        r = await gw.chat(f"request {i}", max_tokens=40)
        statuses.append(r.status_code)
        if r.status_code == 200:
            costs.append(float(r.headers["x-sbactor-cost-usd"]))

    async with trio.open_nursery() as nursery:
        for i in range(200):
            nursery.start_soon(one, a if i % 2 else b, i)
    served = statuses.count(200)
    assert statuses.count(429) + served == 200, statuses
    assert 0 < served < 200
    assert sum(costs) <= cap + 1e-12
    # what redis holds settles to the served spend, and never above the cap
    [key] = [k for k in redis.cli("--scan", "--pattern", "cap:b:*").split() if not k.endswith(":h")]
    await _poll(lambda: abs(float(redis.cli("HGET", key, "spent_cost") or 0) - sum(costs)) < 1e-9,
                "reconciled spend reaches redis")
    assert float(redis.cli("HGET", key, "spent_cost")) <= cap
    assert float(redis.cli("HGET", key, "reserved_cost") or 0) == pytest.approx(0, abs=1e-12)
    assert int(redis.cli("TTL", key)) > 0  # the window key expires on its own


async def test_rpm_limit_holds_across_instances(
    start_mock: StartMock, start_gateway: StartGateway, redis: RedisServer
) -> None:
    upstream = await start_mock()
    cfg = shared_config(
        upstream, redis, "rpm:",
        server={"auth": "keys"},
        keys=[{"id": "ka", "key_sha256": hash_key(KEY_A), "team": "t"},
              {"id": "kb", "key_sha256": hash_key(KEY_B), "team": "t"}],
        rate_limits=[{"scope": "team", "rpm": 5}],
    )
    a, b = await start_gateway(cfg), await start_gateway(cfg)
    codes = []
    for i in range(8):
        gw, key = (a, KEY_A) if i % 2 else (b, KEY_B)
        r = await gw.chat(f"hi {i}", headers={"authorization": f"Bearer {key}"})
        codes.append(r.status_code)
        if r.status_code == 429:
            assert r.json()["error"]["code"] == "rate_limit_exceeded"
            assert int(r.headers["retry-after"]) >= 1
    assert codes.count(200) == 5 and codes.count(429) == 3, codes


# ---- routing feedback across instances ----------------------------------------------------------


async def test_feedback_from_one_instance_moves_routing_on_the_other(
    start_mock: StartMock, start_gateway: StartGateway, redis: RedisServer
) -> None:
    upstream = await start_mock()
    cfg = shared_config(
        upstream, redis, "fb:",
        routing={"min_samples": 0, "explore_rate": 0.0},
        models=[{"name": "m", "routing": "outcome_aware", "deployments": [
            {"provider": "up", "model": "up-a", "price": {"input_per_mtok": 1, "output_per_mtok": 1}},
            {"provider": "up", "model": "up-b", "price": {"input_per_mtok": 5, "output_per_mtok": 5}},
        ]}],
        resilience={"retry_policy": {"server_error": 0}},
    )
    a, b = await start_gateway(cfg), await start_gateway(cfg)
    # Instance A learns that the cheap deployment fails.
    for i in range(6):
        await a.chat(f"fail {i} [mock:status=500][mock:only_model=up-a]")
    cheap = next(c.deployment_id for c in a.gateway.candidates["m"] if c.model == "up-a")
    assert a.gateway.feedback.stats_snapshot()[cheap].samples > 0
    # B never served anything, yet sees A's outcomes and routes away from the failing one.
    await _poll(lambda: cheap in b.gateway.feedback.stats_snapshot(), "B reads shared stats")
    assert b.gateway.feedback.stats_snapshot()[cheap].successes == 0
    before = len(upstream.received())
    for i in range(6):
        r = await b.chat(f"fine {i}")
        assert r.status_code == 200
    models = [body["model"] for body in upstream.received()[before:]]
    assert models == ["up-b"] * 6, models
    view = (await b.client.get("/admin/routing")).json()
    rows = {d["model"]: d for d in view["models"][0]["deployments"]}
    assert rows["up-a"]["samples"] >= 1 and rows["up-a"]["successes"] == 0


# ---- redis faults -------------------------------------------------------------------------------


def _ledger_cfg(upstream: MockUpstream, redis: RedisServer, prefix: str, mode: str) -> Any:
    return shared_config(
        upstream, redis, prefix,
        state={"on_unavailable": mode},
        budgets=[{"scope": "global", "window": "day", "max_cost_usd": 100}],
        usage_sinks=[{"type": "jsonl", "path": "usage.jsonl"}, {"type": "ledger", "path": "ledger"}],
    )


async def _load(gw: RunningGateway, n: int, start: int, kill: Any = None) -> list[int]:
    codes: list[int] = []

    async def one(i: int) -> None:
        r = await gw.chat(f"load {i}", max_tokens=20)
        codes.append(r.status_code)
        if kill is not None and len(codes) == n // 4:
            kill()  # a quarter answered, the rest in flight or still to come

    async with trio.open_nursery() as nursery:
        for i in range(start, start + n):
            nursery.start_soon(one, i)
    return codes


async def test_redis_killed_mid_load_fail_closed(
    start_mock: StartMock, start_gateway: StartGateway, redis: RedisServer
) -> None:
    upstream = await start_mock()
    gw = await start_gateway(_ledger_cfg(upstream, redis, "fc:", "fail_closed"))
    codes = await _load(gw, 40, 0, kill=redis.kill)
    assert set(codes) <= {200, 503} and codes.count(200) > 0, codes
    r = await gw.chat("after the kill")
    assert r.status_code == 503
    err = r.json()["error"]
    assert err["code"] == "state_unavailable" and "fail_closed" in err["message"]
    ready = await gw.client.get("/readyz")
    assert ready.status_code == 503 and "redis" in " ".join(ready.json()["reasons"])
    # redis returns: ready again, serving again
    await redis.start()
    await _poll_ready(gw)
    assert (await gw.chat("back")).status_code == 200
    total = len(codes) + 2
    await gw.stop()
    await trio.sleep(0.2)
    events = await _usage(gw)
    await _poll(lambda: len(gw.data_dir.joinpath("usage.jsonl").read_text().splitlines()) >= total,
                "every request has its usage event")
    report = verify(gw.data_dir / "ledger")
    assert report.ok and report.entries == total, (report, len(events))


async def _poll_ready(gw: RunningGateway) -> None:
    with trio.fail_after(10):
        while (await gw.client.get("/readyz")).status_code != 200:
            await trio.sleep(0.02)


async def test_redis_killed_mid_load_fail_open_reconciles_later(
    start_mock: StartMock, start_gateway: StartGateway, redis: RedisServer
) -> None:
    upstream = await start_mock()
    gw = await start_gateway(_ledger_cfg(upstream, redis, "fo:", "fail_open"))
    codes = await _load(gw, 40, 0, kill=redis.kill)
    assert codes == [200] * 40, codes
    r = await gw.chat("degraded")
    assert r.status_code == 200
    degraded_cost = float(r.headers["x-sbactor-cost-usd"])
    ready = await gw.client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["degraded"]
    await redis.start()  # comes back empty (no persistence): the queued spend is pushed
    tracker: Any = gw.gateway.budgets
    await _poll(lambda: tracker.state_summary()["pending_spend"] == 0 and
                tracker.state_summary()["pushed_after_outage"] > 0, "queued spend flushed")
    [key] = [k for k in redis.cli("--scan", "--pattern", "fo:b:*").split() if not k.endswith(":h")]
    assert float(redis.cli("HGET", key, "spent_cost")) >= degraded_cost
    assert (await gw.client.get("/readyz")).json() == {"ready": True}
    await gw.stop()
    total = 41
    await _poll(lambda: (gw.data_dir / "usage.jsonl").exists() and
                len((gw.data_dir / "usage.jsonl").read_text().splitlines()) >= total, "events")
    events = await _usage(gw)
    tagged = [e for e in events if "state_degraded" in (e.get("tags") or [])]
    assert tagged, "requests served on local counters are marked state_degraded"
    report = verify(gw.data_dir / "ledger")
    assert report.ok and report.entries == total


# ---- workers ------------------------------------------------------------------------------------


async def test_two_workers_serve_one_port_and_verify_as_separate_chains(
    mock_upstream: MockUpstream, redis: RedisServer, tmp_path: Path
) -> None:
    seed = "11" * 32
    cfg = shared_config(mock_upstream, redis, "wk:",
                        usage_sinks=[{"type": "ledger", "path": "ledger",
                                      "signing_seed_hex": seed}])
    config_file = tmp_path / "sbactor.yaml"
    config_file.write_text(yaml.safe_dump(cfg))
    data = tmp_path / "data"
    port = _free_port()
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "sbactor", "serve", "--config", str(config_file), "--bind",
         f"127.0.0.1:{port}", "--data-dir", str(data), "--workers", "2"],
        stdout=subprocess.PIPE, cwd=REPO,
    )
    try:
        assert proc.stdout is not None
        with trio.fail_after(20):
            line = b""
            while b"(2 workers)" not in line:
                chunk = await proc.stdout.receive_some()
                assert chunk, "workers parent exited early"
                line += chunk
        async with httpx2.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            for i in range(20):
                # a fresh connection each time so the kernel can spread them over the workers
                async with httpx2.AsyncClient(base_url=f"http://127.0.0.1:{port}") as one:
                    r = await one.post("/v1/chat/completions", json={
                        "model": "m", "messages": [{"role": "user", "content": f"w {i}"}]})
                assert r.status_code == 200
            assert (await client.get("/readyz")).status_code == 200
        proc.send_signal(signal.SIGTERM)
        with trio.fail_after(20):
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
    ledger = data / "ledger"
    chains = chain_dirs(ledger)
    assert [c.name for c in chains] == ["worker-0", "worker-1"]
    reports = [verify(c) for c in chains]
    assert all(r.ok and r.checkpoint_checked for r in reports)
    assert sum(r.entries for r in reports) == 20
    out = subprocess.run(
        [sys.executable, "-m", "sbactor", "ledger", "verify", str(ledger), "--signing-seed-hex",
         seed], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert "2 chain(s), 2 valid, 20 entries" in out.stdout
    assert "worker-0" in out.stdout and "worker-1" in out.stdout


# ---- the example --------------------------------------------------------------------------------


async def test_scale_out_example_serves(
    mock_upstream: MockUpstream, start_gateway: StartGateway, redis: RedisServer
) -> None:
    text = (REPO / "examples" / "scale-out" / "sbactor.yaml").read_text()
    cfg = parse_config(yaml.safe_load(text), env={"MOCK_UPSTREAM_URL": mock_upstream.openai_base,
                                                  "REDIS_URL": redis.url})
    assert cfg.state.backend == "redis"
    gw = await start_gateway(cfg)
    r = await gw.client.post("/v1/chat/completions", headers={"authorization": "Bearer sk-demo-alice"},
                             json={"model": "gpt-4o-mini",
                                   "messages": [{"role": "user", "content": "hello"}]})
    assert r.status_code == 200, r.text
