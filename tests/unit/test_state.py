"""Pure parts of the shared-state backend: config, URL redaction, worker configs, stats mapping."""

from __future__ import annotations

import math

import attrs
import pytest

from sbactor.config import ConfigError, parse_config
from sbactor.ledger.verify import chain_dirs
from sbactor.state.client import StateClient, _redacted
from sbactor.state.feedback import stats_from_hash
from sbactor.state.resp import Endpoint, Parser, RedisError, encode, parse_url
from sbactor.state.scripts import SCRIPTS
from sbactor.workers import worker_config

BASE = {
    "providers": [{"name": "p", "type": "mock"}],
    "models": [{"name": "m", "deployments": [{"provider": "p"}]}],
}


def test_state_defaults_to_memory() -> None:
    cfg = parse_config(BASE, env={})
    assert cfg.state.backend == "memory" and cfg.server.workers == 1


def test_redis_state_validation() -> None:
    with pytest.raises(ConfigError, match="state.timeout_s"):
        parse_config({**BASE, "state": {"backend": "redis", "timeout_s": 0}}, env={})
    with pytest.raises(ConfigError, match="state.on_unavailable"):
        parse_config({**BASE, "state": {"backend": "redis", "on_unavailable": "maybe"}}, env={})
    ok = parse_config({**BASE, "server": {"workers": 3},
                       "state": {"backend": "redis", "url": "unix:///tmp/r.sock"}}, env={})
    assert ok.server.workers == 3


def test_url_password_is_redacted() -> None:
    assert _redacted("redis://:hunter2@db:6379/0") == "redis://***@db:6379/0"
    assert _redacted("redis://db:6379/0") == "redis://db:6379/0"


def test_client_is_down_until_connected() -> None:
    cfg = parse_config({**BASE, "state": {"backend": "redis"}}, env={})
    client = StateClient(cfg.state)
    reason = client.unavailable_reason()
    assert not client.up and reason is not None and "127.0.0.1:6379" in reason


def test_worker_config_gives_each_worker_its_own_chain_and_files() -> None:
    cfg = parse_config({**BASE, "state": {"backend": "redis"}, "usage_sinks": [
        {"type": "ledger", "path": "ledger"}, {"type": "jsonl", "path": "logs/usage.jsonl"}]},
        env={})
    w1 = worker_config(cfg, 1)
    paths = [s.path for s in w1.usage_sinks]
    assert paths == ["ledger/worker-1", "logs/usage.worker-1.jsonl"]


def test_stats_from_hash_maps_age_onto_the_local_clock() -> None:
    s = stats_from_hash({"samples": "4", "successes": "3", "ewma_success": "0.7",
                         "ewma_cost": "0.001", "last_update": "1"}, age_s=2.0, now=100.0)
    assert (s.samples, s.successes, s.ewma_success, s.ewma_cost) == (4, 3, 0.7, 0.001)
    assert s.last_update == 98.0 and s.ewma_latency is None
    empty = stats_from_hash({}, None, 5.0)
    assert empty.samples == 0 and empty.last_update is None and math.isclose(empty.ewma_success, 1)


def test_scripts_are_present() -> None:
    assert set(SCRIPTS) == {"reserve", "reconcile", "feedback_update", "feedback_claim",
                            "feedback_read"}


# ---- the RESP client's pure parts ---------------------------------------------------------------


def test_resp_encode() -> None:
    assert encode("EVALSHA", "ab", 2, 0.5, b"x") == (
        b"*5\r\n$7\r\nEVALSHA\r\n$2\r\nab\r\n$1\r\n2\r\n$3\r\n0.5\r\n$1\r\nx\r\n")
    with pytest.raises(TypeError):
        encode("SET", None)


def test_resp_parser_handles_every_reply_type_across_split_reads() -> None:
    wire = b"+OK\r\n-NOSCRIPT No matching script\r\n:42\r\n$6\r\nh\xc3\xa9llo\r\n$-1\r\n" \
        b"*3\r\n$2\r\nok\r\n*1\r\n:1\r\n$0\r\n\r\n*-1\r\n"
    for step in (1, 3, len(wire)):  # byte by byte, small chunks, all at once
        parser = Parser()
        out = []
        for i in range(0, len(wire), step):
            parser.feed(wire[i:i + step])
            while True:
                whole, value = parser.pop()
                if not whole:
                    break
                out.append(value)
        assert out[0] == "OK" and isinstance(out[1], RedisError)
        assert str(out[1]).startswith("NOSCRIPT")
        assert out[2:] == [42, "héllo", None, ["ok", [1], ""], None], step


def test_resp_url_parsing() -> None:
    assert parse_url("redis://127.0.0.1:6390/2") == Endpoint(host="127.0.0.1", port=6390, db=2)
    ep = parse_url("rediss://user:p%40ss@cache.internal/0")
    assert (ep.tls, ep.username, ep.password, ep.port, ep.db) == (True, "user", "p@ss", 6379, 0)
    assert parse_url("redis://:secret@h").password == "secret"
    assert parse_url("unix:///run/redis.sock?db=3") == Endpoint(path="/run/redis.sock", db=3)


def test_verdict_round_trips_through_the_shared_cache_format() -> None:
    from sbactor.guardrails.fusion import GuardrailResult
    from sbactor.guardrails.verdict import Span, Verdict
    from sbactor.state.verdict_cache import dump_result, load_result

    result = GuardrailResult(
        action="redact", flagged_count=1, labels=("pii",),
        verdicts=(Verdict("pii", "pii", True, 1.0, ("pii",), (Span(3, 9, "EMAIL"),)),
                  Verdict("secrets", "secrets", False)),
        cached=True, elapsed_ms=4.0)
    back = load_result(dump_result(result).decode())
    assert back == attrs.evolve(result, cached=False, elapsed_ms=0.0)


def test_chain_dirs(tmp_path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "worker-1").mkdir()
    (tmp_path / "worker-1" / "ledger-000001.jsonl").write_text("")
    (tmp_path / "worker-0").mkdir()
    (tmp_path / "worker-0" / "ledger-000001.jsonl").write_text("")
    (tmp_path / "other").mkdir()
    assert [d.name for d in chain_dirs(tmp_path)] == ["worker-0", "worker-1"]
    assert chain_dirs(tmp_path / "worker-0") == []  # itself a chain
