"""The config loader: every problem named by its path, all at once; env substitution; the schema."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from importlib import resources
from pathlib import Path
from typing import Any

import attrs
import pytest
import yaml

from sbactor.config import Config, ConfigError, ServerConfig, load_config, parse_config
from sbactor.config_load import load_yaml_text
from sbactor.config_schema import json_schema

REPO = Path(__file__).resolve().parents[2]
SEED = "11" * 32
# the message lists the allowed keys; derived, so a new server option needs no edit here
SERVER_KEYS = ", ".join(sorted(a.name for a in attrs.fields(ServerConfig)))


def base() -> dict[str, Any]:
    return {
        "providers": [
            {"name": "openai", "type": "openai", "base_url": "http://127.0.0.1:9/v1"},
            {"name": "local", "type": "mock"},
        ],
        "models": [
            {"name": "a", "deployments": [{"provider": "openai", "model": "gpt-x"}]},
            {"name": "b", "deployments": [{"provider": "local"}]},
        ],
    }


def problems_of(data: Any, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data, env=env or {})
    return info.value.problems


def edit(path: str, value: Any) -> dict[str, Any]:
    """``base()`` with the value at a dotted path (``models.1.deployments.0.provider``) set."""
    data = base()
    node: Any = data
    keys = path.split(".")
    for key in keys[:-1]:
        node = node[int(key)] if isinstance(node, list) else node.setdefault(key, {})
    last = keys[-1]
    if value is DELETE:
        del node[last]
    elif isinstance(node, list):
        node[int(last):int(last) + 1] = [value]  # replace, or append at the end
    else:
        node[last] = value
    return data


DELETE = object()

# (description, config, the one exact problem reported)
BROKEN: list[tuple[str, dict[str, Any], str]] = [
    (
        "unknown provider reference",
        edit("models.1.deployments.0.provider", "opnai"),
        "models[1].deployments[0].provider: unknown provider 'opnai' (known: openai, local)",
    ),
    (
        "unknown top-level key",
        edit("colour", "blue"),
        "colour: unknown key (allowed: actors, budget_settings, budgets, guardrails, keys, models,"
        " policy, providers, rate_limits, resilience, routing, server, state, usage_sinks)",
    ),
    (
        "unknown key in a section",
        edit("server.bnd", "127.0.0.1:1"),
        f"server.bnd: unknown key (allowed: {SERVER_KEYS})",
    ),
    (
        "unknown key three levels down",
        edit("models.0.deployments.0.prise", 1),
        "models[0].deployments[0].prise: unknown key (allowed: context_window, model, price,"
        " priority, provider, weight)",
    ),
    (
        "unknown key four levels down",
        edit("models.0.deployments.0.price", {"input_per_mtok": 1, "ouput_per_mtok": 2}),
        "models[0].deployments[0].price.ouput_per_mtok: unknown key (allowed: input_per_mtok,"
        " output_per_mtok)",
    ),
    (
        "string where a number belongs",
        edit("models.0.deployments.0.price", {"input_per_mtok": "cheap"}),
        "models[0].deployments[0].price.input_per_mtok: expected a number, got 'cheap'",
    ),
    (
        "bool where an integer belongs",
        edit("server.backlog", True),
        "server.backlog: expected an integer, got true",
    ),
    (
        "mapping where a string belongs",
        edit("models.0.name", {"x": 1}),
        "models[0].name: expected a string, got a mapping",
    ),
    (
        "scalar where a list belongs",
        edit("models", "a"),
        "models: expected a list, got 'a'",
    ),
    (
        "scalar where a mapping belongs",
        edit("server", "fast"),
        "server: expected a mapping, got 'fast'",
    ),
    (
        "bad enum value",
        edit("models.0.routing", "fastest"),
        "models[0].routing: expected one of 'round_robin', 'weighted', 'lowest_latency',"
        " 'cheapest', 'fallback_chain', 'outcome_aware', got 'fastest'",
    ),
    (
        "bad bind",
        edit("server.bind", "localhost"),
        "server.bind: expected HOST:PORT, got 'localhost'",
    ),
    (
        "negative number",
        edit("server.shutdown_grace_s", -1),
        "server.shutdown_grace_s: must be >= 0, got -1.0",
    ),
    (
        "bad key hash",
        edit("keys", [{"id": "k1", "key_sha256": "abc"}]),
        "keys[0].key_sha256: expected the SHA-256 of the key as 64 lower-case hex characters",
    ),
    (
        "required key missing",
        edit("models.0.deployments", DELETE),
        "models[0].deployments: required key missing",
    ),
    (
        "provider without a name",
        edit("providers.0", {"type": "openai"}),
        "providers[0].name: required key missing",
    ),
    (
        "empty deployments",
        edit("models.0.deployments", []),
        "models[0].deployments: a model needs at least one deployment",
    ),
    (
        "provider validator",
        edit("providers.0.base_url", "ftp://x"),
        "providers[0].base_url: must start with http:// or https://, got 'ftp://x'",
    ),
    (
        "duplicate provider",
        edit("providers.2", {"name": "local", "type": "mock"}),
        "providers[2]: duplicate provider 'local'",
    ),
    (
        "unknown fallback model",
        edit("models.0.fallbacks", ["gpt-5"]),
        "models[0].fallbacks[0]: unknown model 'gpt-5'",
    ),
    (
        "falling back to itself",
        edit("models.0.context_window_fallbacks", ["a"]),
        "models[0].context_window_fallbacks[0]: a model cannot fall back to itself",
    ),
    (
        "unknown provider type (tagged union)",
        edit("providers.0.type", "opnai"),
        "providers[0]: type: unknown type 'opnai' (known: anthropic, mock, openai)",
    ),
    (
        "provider that is not a mapping",
        edit("providers.0", "openai"),
        "providers[0]: expected a mapping with a 'type' field, got 'openai'",
    ),
    (
        "unknown usage sink type (tagged union)",
        edit("usage_sinks", [{"type": "csv"}]),
        "usage_sinks[0]: type: unknown type 'csv' (known: jsonl, ledger)",
    ),
    (
        "two ledger sinks",
        edit("usage_sinks", [{"type": "ledger", "path": "l1", "signing_seed_hex": SEED},
                             {"type": "ledger", "path": "l2", "signing_seed_hex": SEED}]),
        "usage_sinks: at most one ledger sink",
    ),
    (
        "unknown guardrail detector type (tagged union)",
        edit("guardrails", {"input": [{"type": "pii"}, {"type": "pi"}]}),
        "guardrails.input[1]: type: unknown type 'pi' (known: denylist, http, length, pii,"
        " prompt_injection, regex, secrets)",
    ),
    (
        "unknown key in a guardrail detector",
        edit("guardrails", {"input": [{"type": "secrets", "kind": ["API_KEY"]}]}),
        "guardrails.input[0].kind: unknown key (allowed: entropy_min_length, entropy_threshold,"
        " kinds, name, redact, type)",
    ),
    (
        "unknown soft-landing model",
        edit("budgets", [{"scope": "global", "window": "day", "max_cost_usd": 1,
                          "soft_landing": {"downgrade_to": "zz"}}]),
        "budgets[0].soft_landing.downgrade_to: unknown model 'zz'",
    ),
]


@pytest.mark.parametrize(("data", "expected"), [c[1:] for c in BROKEN], ids=[c[0] for c in BROKEN])
def test_broken_config_names_its_path(data: dict[str, Any], expected: str) -> None:
    assert problems_of(data) == [expected]


def test_base_config_is_valid() -> None:
    config = parse_config(base(), env={})
    assert [p.name for p in config.providers] == ["openai", "local"]
    assert config.model("a") is not None and config.model("zz") is None


def test_all_problems_are_reported_at_once() -> None:
    data = base()
    data["server"] = {"bind": "nope", "shutdown_grace_s": -1, "max_in_flight": 0, "colour": 1}
    data["models"][0]["routing"] = "fastest"
    data["models"][1]["deployments"][0]["price"] = {"input_per_mtok": "x"}
    data["guardrails"] = {"input": [{"type": "pi"}], "mesh": {"budget": 5}}
    problems = problems_of(data)
    assert problems == [
        "server.bind: expected HOST:PORT, got 'nope'",
        "server.shutdown_grace_s: must be >= 0, got -1.0",
        "server.max_in_flight: must be > 0, got 0",
        f"server.colour: unknown key (allowed: {SERVER_KEYS})",
        "models[0].routing: expected one of 'round_robin', 'weighted', 'lowest_latency',"
        " 'cheapest', 'fallback_chain', 'outcome_aware', got 'fastest'",
        "models[1].deployments[0].price.input_per_mtok: expected a number, got 'x'",
        "guardrails.input[0]: type: unknown type 'pi' (known: denylist, http, length, pii,"
        " prompt_injection, regex, secrets)",
        "guardrails.mesh.budget: unknown key (allowed: block_threshold, cache, cache_capacity,"
        " latency_budget_ms, on_detector_error, redact_on_flag)",
    ]


def test_several_validator_failures_in_one_section_all_reported() -> None:
    data = base()
    data["server"] = {"bind": "nope", "shutdown_grace_s": -1, "max_in_flight": 0}
    assert problems_of(data) == [
        "server.bind: expected HOST:PORT, got 'nope'",
        "server.shutdown_grace_s: must be >= 0, got -1.0",
        "server.max_in_flight: must be > 0, got 0",
    ]


def test_cross_checks_all_reported() -> None:
    data = base()
    data["models"][0]["deployments"][0]["provider"] = "opnai"
    data["models"][1]["fallbacks"] = ["x", "y"]
    data["providers"].append({"name": "openai", "type": "mock"})
    assert problems_of(data) == [
        "providers[2]: duplicate provider 'openai'",
        "models[0].deployments[0].provider: unknown provider 'opnai' (known: openai, local,"
        " openai)",
        "models[1].fallbacks[0]: unknown model 'x'",
        "models[1].fallbacks[1]: unknown model 'y'",
    ]


# ---- ${ENV} substitution -------------------------------------------------------------------------


def test_env_substitution_with_and_without_default() -> None:
    data = base()
    data["server"] = {"admin_key": "${ADMIN}", "bind": "${HOST:-127.0.0.1}:${PORT:-8123}"}
    data["providers"][0]["api_key"] = "sk-${KEY_PART}-end"
    config = parse_config(data, env={"ADMIN": "s3cret", "KEY_PART": "abc"})
    assert config.server.admin_key == "s3cret"
    assert config.server.bind == "127.0.0.1:8123"
    assert config.providers[0].api_key == "sk-abc-end"  # type: ignore[union-attr]
    config = parse_config(data, env={"ADMIN": "a", "KEY_PART": "b", "PORT": "9000"})
    assert config.server.bind == "127.0.0.1:9000"


def test_env_value_is_structured_like_yaml_text() -> None:
    data = base()
    data["server"] = {"shutdown_grace_s": "${GRACE}"}
    # substitution happens on strings; the result must still be the right type
    assert problems_of(data, env={"GRACE": "3"}) == [
        "server.shutdown_grace_s: expected a number, got '3'"
    ]


def test_unset_env_without_default_is_an_error_with_path() -> None:
    data = base()
    data["server"] = {"admin_key": "${SBACTOR_TEST_UNSET_ADMIN}"}
    data["providers"][0]["api_key"] = "${SBACTOR_TEST_UNSET_KEY}"
    assert problems_of(data) == [  # in document order
        "providers[0].api_key: environment variable SBACTOR_TEST_UNSET_KEY is not set",
        "server.admin_key: environment variable SBACTOR_TEST_UNSET_ADMIN is not set",
    ]


def test_empty_default_is_allowed() -> None:
    data = base()
    data["providers"][0]["api_key"] = "${SBACTOR_TEST_UNSET:-}"
    assert parse_config(data, env={}).providers[0].api_key == ""  # type: ignore[union-attr]


def test_load_config_uses_process_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = base()
    data["server"] = {"admin_key": "${SBACTOR_TEST_ADMIN_KEY}"}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    monkeypatch.setenv("SBACTOR_TEST_ADMIN_KEY", "from-env")
    assert load_config(path).server.admin_key == "from-env"
    monkeypatch.delenv("SBACTOR_TEST_ADMIN_KEY")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems == [
        "server.admin_key: environment variable SBACTOR_TEST_ADMIN_KEY is not set"
    ]


# ---- YAML ----------------------------------------------------------------------------------------


def test_yaml_syntax_error_has_line_and_column() -> None:
    with pytest.raises(ConfigError) as info:
        load_yaml_text("server:\n  bind: 127.0.0.1:1\n  auth: off: now\n", "f.yaml")
    assert info.value.problems == [
        "f.yaml: invalid YAML at line 3, column 12: mapping values are not allowed here"
    ]


def test_yaml_must_be_a_mapping_and_empty_is_defaults() -> None:
    with pytest.raises(ConfigError) as info:
        load_yaml_text("- a\n- b\n", "f.yaml")
    assert info.value.problems == ["f.yaml: the config must be a mapping at the top level"]
    config = parse_config(load_yaml_text("", "empty.yaml"), env={})
    assert config == Config()


def test_unreadable_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "missing.yaml")
    (problem,) = info.value.problems
    assert problem.startswith(f"{tmp_path / 'missing.yaml'}: cannot read config:")


# ---- the CLI and the schema ----------------------------------------------------------------------


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sbactor", *args],
        capture_output=True, text=True, timeout=60, cwd=REPO,
    )


def test_config_check_exit_codes(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(base()))
    r = run_cli("config", "check", str(good))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"{good}: ok (2 providers, 2 models, 0 keys)"

    bad = tmp_path / "bad.yaml"
    data = base()
    data["models"][1]["deployments"][0]["provider"] = "opnai"
    data["server"] = {"bnd": 1, "backlog": "big"}
    bad.write_text(yaml.safe_dump(data))
    r = run_cli("config", "check", str(bad))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert lines[0] == f"sbactor: {bad}: 2 problem(s) in the config:"
    assert lines[1] == "  server.backlog: expected an integer, got 'big'"
    assert lines[2].startswith("  server.bnd: unknown key")
    assert "Traceback" not in r.stderr
    # reference checks (names of providers/models) run once the structure is valid
    data["server"] = {}
    bad.write_text(yaml.safe_dump(data))
    r = run_cli("config", "check", str(bad))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[1:] == [
        "  models[1].deployments[0].provider: unknown provider 'opnai' (known: openai, local)"
    ]

    broken = tmp_path / "broken.yaml"
    broken.write_text("server: [\n")
    r = run_cli("config", "check", str(broken))
    assert r.returncode == 2
    assert "invalid YAML at line 2" in r.stderr
    assert "Traceback" not in r.stderr


def _walk_refs(node: Any, refs: set[str]) -> None:
    if isinstance(node, dict):
        if "$ref" in node:
            refs.add(node["$ref"])
        for v in node.values():
            _walk_refs(v, refs)
    elif isinstance(node, list):
        for v in node:
            _walk_refs(v, refs)


def test_config_schema_output() -> None:
    r = run_cli("config", "schema")
    assert r.returncode == 0, r.stderr
    schema = json.loads(r.stdout)
    assert schema["$schema"].startswith("https://json-schema.org/")
    assert schema["$ref"] == "#/$defs/Config"
    root = schema["$defs"]["Config"]
    assert root["type"] == "object"
    assert root["additionalProperties"] is False  # unknown keys are errors there too
    assert set(root["properties"]) == {
        "server", "keys", "providers", "models", "routing", "resilience", "guardrails",
        "budgets", "rate_limits", "budget_settings", "policy", "usage_sinks", "actors", "state",
    }
    # every $ref resolves, every object def is closed, and defaults are plain values
    refs: set[str] = set()
    _walk_refs(schema, refs)
    for ref in refs:
        assert ref.startswith("#/$defs/")
        assert ref.removeprefix("#/$defs/") in schema["$defs"], ref
    for name, definition in schema["$defs"].items():
        assert definition["type"] == "object", name
        assert definition["additionalProperties"] is False, name
    server = schema["$defs"]["ServerConfig"]["properties"]
    assert server["bind"] == {"type": "string", "default": "127.0.0.1:8080"}
    assert server["auth"]["enum"] == ["keys", "off"]
    model = schema["$defs"]["ModelConfig"]
    assert model["required"] == ["name", "deployments"]
    # the tagged unions list one $ref per member type
    providers = root["properties"]["providers"]["items"]["anyOf"]
    assert {p["$ref"] for p in providers} == {
        "#/$defs/OpenAIProviderConfig", "#/$defs/AnthropicProviderConfig",
        "#/$defs/MockProviderConfig",
    }
    assert schema == json.loads(json.dumps(json_schema(Config)))


# ---- shipped configs -----------------------------------------------------------------------------


def test_demo_config_parses() -> None:
    text = resources.files("sbactor").joinpath("demo.yaml").read_text(encoding="utf-8")
    config = parse_config(load_yaml_text(text, "demo"), env={})
    assert config.server.auth == "off"
    assert {m.name for m in config.models} >= {"gpt-4o", "gpt-4o-mini"}
    assert config.guardrails is not None and config.policy is not None
    assert config.budgets and config.usage_sinks


EXAMPLES = sorted(REPO.glob("examples/*/sbactor.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.parent.name for p in EXAMPLES])
def test_example_config_parses(path: Path) -> None:
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    config = parse_config(copy.deepcopy(data), env={"MOCK_UPSTREAM_URL": "http://127.0.0.1:9/v1"})
    assert config.models, "an example must serve at least one model"


def test_there_are_examples() -> None:
    assert EXAMPLES, "examples/*/sbactor.yaml"
