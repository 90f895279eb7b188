"""Scale-out: two gateway instances (separate actors) sharing one real redis-server.

The redis fixture starts ``redis-server`` from PATH on a free loopback port (no persistence) and
stops it afterwards. Without redis-server the tests skip — except in CI (env ``CI`` set), where a
missing redis-server is a failure: .ci/run installs it.
"""

from __future__ import annotations

import hashlib
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


async def test_forecast_uses_the_burn_rate_of_all_instances(
    start_mock: StartMock, start_gateway: StartGateway, redis: RedisServer
) -> None:
    """``act_on: forecast`` with two instances: each sees the shared spend grow at the rate of
    both (not only its own half) and lands softly while the spend is still far from the cap."""
    from tests.e2e.test_budgets import COST, NOON, REPLY, FakeWallClock, _chat, _config, _rows

    mock = await start_mock(reply=REPLY)
    budget = {
        "name": "burn", "scope": "global", "window": "day", "max_cost_usd": 100 * COST,
        "soft_landing": {"warn_at": 0.5, "downgrade_at": 0.9, "downgrade_to": "cheap",
                         "act_on": "forecast"},
    }
    settings = {"forecast_interval_s": 60, "forecast_min_samples": 3, "snapshot_path": ""}
    state = {"backend": "redis", "url": redis.url, "key_prefix": "burn:", "timeout_s": 0.5}
    cfg = _config(mock, budgets=[budget], budget_settings=settings, state=state)
    a, b = await start_gateway(cfg), await start_gateway(cfg)
    clock = FakeWallClock(NOON)
    for gw in (a, b):
        assert gw.gateway.budgets is not None
        gw.gateway.budgets.clock = clock

    async def shared_spend() -> float:
        return float((await _rows(a))["burn|*"]["spent_usd"])

    # One request a minute, alternating: 1 % of the cap a minute in all, 12 h left in the day.
    # a reads the shared spend at minutes 0, 2, 4 (2 + 2 samples by minute 4); b at 1, 3, 5.
    warned: list[tuple[int, str]] = []
    spent = 0.0
    for minute in range(6):
        gw = a if minute % 2 == 0 else b
        r = await _chat(gw)
        assert r.status_code == 200
        if "x-sbactor-budget-warning" in r.headers:
            warned.append((minute, mock.received()[-1]["model"]))
            assert "forecast" in r.headers["x-sbactor-budget-warning"]
        spent += float(r.headers["x-sbactor-cost-usd"])
        with trio.fail_after(10):  # its reconcile reaches redis before the next reading
            while await shared_spend() < spent - 1e-12:
                await trio.sleep(0.02)
        clock.now += 60
    assert warned == [(4, "up-cheap"), (5, "up-cheap")]  # each once it has 3 samples
    assert spent == pytest.approx(4 * COST + 2 * COST / 10)

    row = (await _rows(a))["burn|*"]
    assert row["source"] == "redis" and row["fraction"] < 0.1 < 1 < row["forecast_fraction"]
    # a's readings (minutes 0, 2, 4: 0, 2 and 4 COST spent by both) give 2 + 2 samples of
    # 2 COST per 2 minutes: 60 COST an hour; a's own spend would give half of it
    assert row["burn_rate_usd_per_hour"] == pytest.approx(60 * COST, rel=1e-6)


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
    errors = tmp_path / "workers.err"
    with errors.open("wb") as stderr:
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-m", "sbactor", "serve", "--config", str(config_file), "--bind",
             "127.0.0.1:0", "--data-dir", str(data), "--workers", "2"],
            stdout=subprocess.PIPE, stderr=stderr, cwd=REPO,
        )
    try:
        assert proc.stdout is not None
        with trio.fail_after(20):
            line = b""
            while b"(2 workers)" not in line:
                chunk = await proc.stdout.receive_some()
                assert chunk, f"workers parent exited early: {errors.read_text()[-2000:]}"
                line += chunk
        # "sbactor listening on http://127.0.0.1:PORT (2 workers)": the parent reserved a port
        port = int(line.split(b"(2 workers)")[0].rsplit(b":", 1)[1])
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
    rid = r.headers["x-request-id"]
    await _poll(lambda: redis.cli("EXISTS", f"sbactor-demo:req:{rid}") == "1", "request map")
    fb = await gw.client.post("/v1/feedback", headers={"authorization": "Bearer sk-demo-alice"},
                              json={"request_id": rid, "outcome": "success"})
    assert fb.json()["status"] == "applied", fb.text
    admin = await gw.client.get("/admin/budgets", headers={"x-admin-key": "admin-demo"})
    assert admin.json()["budgets"][0]["source"] == "redis"


# ---- separate processes -------------------------------------------------------------------------


async def _serve_process(config_file: Path, data_dir: Path, stderr: Path) -> tuple[Any, str]:
    """``python -m sbactor serve --config F --bind 127.0.0.1:0``; returns once it listens."""
    with stderr.open("wb") as err:
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-m", "sbactor", "serve", "--config", str(config_file), "--bind",
             "127.0.0.1:0", "--data-dir", str(data_dir)],
            stdout=subprocess.PIPE, stderr=err, cwd=REPO,
        )
    assert proc.stdout is not None
    marker, buffer = b"sbactor listening on http://", b""
    with trio.fail_after(30):
        while b"\n" not in buffer.partition(marker)[2]:
            chunk = await proc.stdout.receive_some(4096)
            assert chunk, f"serve exited early:\n{stderr.read_text()}"
            buffer += chunk
    return proc, buffer.partition(marker)[2].split(b"\n", 1)[0].decode().strip()


async def test_two_processes_share_one_cap_and_one_rpm_limit(
    mock_upstream: MockUpstream, redis: RedisServer, tmp_path: Path
) -> None:
    cap = 0.002  # each request reserves its worst case (~0.0001 USD): about 20 fit
    cfg = shared_config(
        mock_upstream, redis, "procs:",
        server={"auth": "keys"},
        keys=[{"id": "kb", "key_sha256": hash_key("sk-burst"), "team": "burst"},
              {"id": "ks", "key_sha256": hash_key("sk-slow"), "team": "slow"}],
        budgets=[{"scope": "team", "match": "burst", "window": "day", "max_cost_usd": cap}],
        rate_limits=[{"scope": "team", "match": "slow", "rpm": 6}],
        usage_sinks=[{"type": "jsonl", "path": "usage.jsonl"}],
    )
    config_file = tmp_path / "sbactor.yaml"
    config_file.write_text(yaml.safe_dump(cfg))
    procs: list[Any] = []
    addresses: list[str] = []

    async def start(name: str) -> None:
        proc, address = await _serve_process(config_file, tmp_path / name,
                                             tmp_path / f"{name}.stderr")
        procs.append(proc)
        addresses.append(address)

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(start, "a")
            nursery.start_soon(start, "b")
        assert procs[0].pid != procs[1].pid
        limits = httpx2.Limits(max_connections=200)
        clients = [httpx2.AsyncClient(base_url=f"http://{a}", timeout=30, limits=limits)
                   for a in addresses]
        statuses: list[list[int]] = [[], []]
        costs: list[float] = []

        async def one(i: int) -> None:
            r = await clients[i % 2].post(
                "/v1/chat/completions", headers={"authorization": "Bearer sk-burst"},
                json={"model": "m", "max_tokens": 40,
                      "messages": [{"role": "user", "content": f"burst {i}"}]})
            statuses[i % 2].append(r.status_code)
            if r.status_code == 200:
                costs.append(float(r.headers["x-sbactor-cost-usd"]))
            else:
                assert r.json()["error"]["code"] == "budget_exceeded", r.text

        async with trio.open_nursery() as nursery:
            for i in range(200):
                nursery.start_soon(one, i)
        served = sum(s.count(200) for s in statuses)
        assert all(len(s) == 100 and set(s) <= {200, 429} for s in statuses), statuses
        assert 0 < served < 200 and sum(costs) <= cap + 1e-12

        # rpm 6 for team "slow", requests alternating between the two processes
        codes = []
        for i in range(10):
            r = await clients[i % 2].post(
                "/v1/chat/completions", headers={"authorization": "Bearer sk-slow"},
                json={"model": "m", "messages": [{"role": "user", "content": f"slow {i}"}]})
            codes.append(r.status_code)
        assert codes == [200] * 6 + [429] * 4, codes
        for client in clients:
            await client.aclose()
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        with trio.fail_after(20):
            for proc in procs:
                assert await proc.wait() == 0
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
    # both usage logs together: every request has its event, the spend stays under the cap
    events = [json.loads(line) for name in ("a", "b")
              for line in (tmp_path / name / "usage.jsonl").read_text().splitlines()]
    burst = [e for e in events if (e.get("principal") or {}).get("team") == "burst"]
    assert len(burst) == 200
    logged = sum(float(e.get("cost_usd") or 0) for e in burst)
    assert logged <= cap + 1e-12 and logged == pytest.approx(sum(costs), abs=1e-12)
    assert all(len((tmp_path / n / "usage.jsonl").read_text().splitlines()) > 0 for n in "ab")


# ---- client feedback on any instance ------------------------------------------------------------


async def test_feedback_on_an_instance_that_did_not_serve_the_request(
    mock_upstream: MockUpstream, start_gateway: StartGateway, redis: RedisServer
) -> None:
    cfg = shared_config(mock_upstream, redis, "fbx:", state={"feedback_ttl_s": 600},
                        usage_sinks=[{"type": "jsonl", "path": "usage.jsonl"}])
    a, b = await start_gateway(cfg), await start_gateway(cfg)
    served = await a.chat("answer me")
    assert served.status_code == 200
    rid = served.headers["x-request-id"]
    key = f"fbx:req:{rid}"
    await _poll(lambda: redis.cli("EXISTS", key) == "1", "A records request -> deployment")
    assert 0 < int(redis.cli("TTL", key)) <= 600
    deployment = redis.cli("HGET", key, "d")
    assert deployment == a.gateway.candidates["m"][0].deployment_id

    r = await b.client.post("/v1/feedback", json={"request_id": rid, "outcome": "failure"})
    assert r.status_code == 200, r.text
    assert r.json() == {"request_id": rid, "status": "applied", "deployment": deployment}
    # one claim across the fleet: the serving instance sees a duplicate
    again = await a.client.post("/v1/feedback", json={"request_id": rid, "outcome": "success"})
    assert again.json()["status"] == "duplicate"
    # the shared stats moved: A (which never got the feedback itself) reads it back
    assert redis.cli("HGET", f"fbx:fb:{deployment}", "feedback") == "1"
    await _poll(lambda: a.gateway.feedback.stats_snapshot()[deployment].feedback == 1,
                "A reads the feedback B applied")
    assert a.gateway.feedback.stats_snapshot()[deployment].ewma_success < 1.0
    unknown = await b.client.post("/v1/feedback", json={"request_id": "nope", "outcome": "success"})
    assert unknown.status_code == 404
    await b.stop()
    await _poll(lambda: (b.data_dir / "usage.jsonl").exists() and any(
        json.loads(line).get("kind") == "feedback"
        for line in (b.data_dir / "usage.jsonl").read_text().splitlines()), "feedback event on B")


# ---- the shared verdict cache -------------------------------------------------------------------


async def test_shared_verdict_cache_reuses_a_verdict_across_instances(
    mock_upstream: MockUpstream, start_gateway: StartGateway, redis: RedisServer
) -> None:
    guardrails = {"input": [{"type": "pii"}, {"type": "secrets"}],
                  "mesh": {"block_threshold": 2, "redact_on_flag": True, "cache": True}}
    cfg = shared_config(mock_upstream, redis, "vc:", state={"shared_verdict_cache": True},
                        guardrails=guardrails)
    a, b = await start_gateway(cfg), await start_gateway(cfg)
    text = "mail me at ada@example.com"
    assert (await a.chat(text)).status_code == 200
    await _poll(lambda: len(redis.cli("--scan", "--pattern", "vc:vc:*").split()) == 1,
                "A stores its verdict in redis")
    [key] = redis.cli("--scan", "--pattern", "vc:vc:*").split()
    assert 0 < int(redis.cli("TTL", key)) <= 3600
    r = await b.chat(text)
    assert r.status_code == 200
    sent = mock_upstream.received()[-1]["messages"][-1]["content"]
    assert "ada@example.com" not in sent  # B redacted from the shared verdict
    stats = b.gateway.verdict_cache.state_summary()  # type: ignore[union-attr]
    assert stats["shared_hits"] == 1 and stats["puts"] == 0 and stats["hits"] == 1
    assert (await b.chat(text)).status_code == 200  # now from B's local tier
    assert b.gateway.verdict_cache.state_summary()["shared_hits"] == 1  # type: ignore[union-attr]
    # another guardrail config never reuses it (the key carries the config fingerprint)
    other = shared_config(mock_upstream, redis, "vc:", state={"shared_verdict_cache": True},
                          guardrails={**guardrails, "mesh": {**guardrails["mesh"],
                                                             "block_threshold": 1}})
    c = await start_gateway(other)
    assert (await c.chat(text)).status_code == 400
    assert c.gateway.verdict_cache.state_summary()["shared_hits"] == 0  # type: ignore[union-attr]
    # off by default: a redis-backed gateway without the option keeps verdicts local
    plain = await start_gateway(shared_config(mock_upstream, redis, "vc2:", guardrails=guardrails))
    assert (await plain.chat(text)).status_code == 200
    assert redis.cli("--scan", "--pattern", "vc2:vc:*") == ""


# ---- /admin/budgets reads the shared counters ---------------------------------------------------


async def test_admin_budgets_shows_the_shared_numbers(
    mock_upstream: MockUpstream, start_gateway: StartGateway, redis: RedisServer
) -> None:
    cfg = shared_config(mock_upstream, redis, "adm:", budgets=[
        {"scope": "global", "window": "day", "max_cost_usd": 10}])
    a, b = await start_gateway(cfg), await start_gateway(cfg)
    costs = []
    for i in range(3):
        r = await a.chat(f"spend {i}")
        costs.append(float(r.headers["x-sbactor-cost-usd"]))
    redis.cli("SCRIPT", "FLUSH")  # a flushed script cache is reloaded transparently
    r = await b.chat("spend on b")
    assert r.status_code == 200
    costs.append(float(r.headers["x-sbactor-cost-usd"]))

    async def row(gw: RunningGateway) -> dict[str, Any]:
        [only] = (await gw.client.get("/admin/budgets")).json()["budgets"]
        return dict(only)

    with trio.fail_after(10):
        while (await row(b))["spent_usd"] < round(sum(costs), 9) - 1e-9:
            await trio.sleep(0.02)
    on_b, on_a = await row(b), await row(a)
    for view in (on_a, on_b):
        assert view["source"] == "redis"
        assert view["spent_usd"] == pytest.approx(sum(costs), abs=1e-9)
        assert view["fraction"] == pytest.approx(sum(costs) / 10, abs=1e-6)
    assert on_b["instance_spent_usd"] == pytest.approx(costs[-1], abs=1e-9)
    assert on_a["instance_spent_usd"] == pytest.approx(sum(costs[:3]), abs=1e-9)
    redis.kill()  # redis gone: the local mirror, marked as such
    assert (await b.chat("refused while down")).status_code == 503
    local = await row(b)
    assert local["source"] == "local" and local["spent_usd"] == pytest.approx(costs[-1], abs=1e-9)


async def test_only_the_key_that_asked_may_send_feedback_across_instances(
    mock_upstream: MockUpstream, start_gateway: StartGateway, redis: RedisServer
) -> None:
    alice, bob = "sk-owner-alice", "sk-owner-bob"
    cfg = shared_config(mock_upstream, redis, "fbo:")
    cfg["server"] = {"auth": "keys"}
    cfg["keys"] = [
        {"id": "alice", "key_sha256": hashlib.sha256(alice.encode()).hexdigest()},
        {"id": "bob", "key_sha256": hashlib.sha256(bob.encode()).hexdigest()},
    ]
    a, b = await start_gateway(cfg), await start_gateway(cfg)
    served = await a.client.post(
        "/v1/chat/completions", headers={"authorization": f"Bearer {alice}"},
        json={"model": "m", "messages": [{"role": "user", "content": "mine"}]})
    assert served.status_code == 200
    rid = served.headers["x-request-id"]
    await _poll(lambda: redis.cli("EXISTS", f"fbo:req:{rid}") == "1", "A records the request")
    body = {"request_id": rid, "outcome": "failure"}
    for gw in (a, b):  # bob is refused on the serving instance and on the other one
        r = await gw.client.post("/v1/feedback", json=body,
                                 headers={"authorization": f"Bearer {bob}"})
        assert r.status_code == 404, r.text
    r = await b.client.post("/v1/feedback", json=body, headers={"authorization": f"Bearer {alice}"})
    assert r.status_code == 200 and r.json()["status"] == "applied"
