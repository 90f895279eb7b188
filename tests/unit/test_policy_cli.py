"""``sbactor policy eval``: the testable function and the registered subcommand."""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import pytest

from sbactor.policy.cli import add_parser, eval_command
from sbactor.policy.config import PolicyConfig

MODELS = {"gpt-4o", "gpt-4o-mini"}
EXPR = (
    'ai.guardrails.flagged_count >= 2 ? "block" : '
    'ai.budget.fraction > 0.9 ? ["route_to:gpt-4o-mini", "audit:medium"] : "allow"'
)

CONFIG = """
providers:
  - {name: mock, type: mock}
models:
  - name: gpt-4o
    deployments: [{provider: mock, model: big}]
  - name: gpt-4o-mini
    deployments: [{provider: mock, model: small}]
policy:
  expression: >-
    ai.budget.fraction > 0.9 ? ["route_to:gpt-4o-mini", "set_sink_tag:near-cap"] : "allow"
  on_error: [block]
"""


def sample(tmp_path: Path, doc: object, name: str = "a.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(doc), encoding="utf-8")
    return path


def run(cfg: PolicyConfig | None, path: Path, fmt: str = "text") -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = eval_command(cfg, MODELS, path, fmt=fmt, out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def test_text_output(tmp_path: Path) -> None:
    path = sample(tmp_path, {"ai": {"budget": {"fraction": 0.95}}})
    code, out, err = run(PolicyConfig(expression=EXPR), path)
    assert code == 0 and err == ""
    assert "actions:  route_to:gpt-4o-mini, audit:medium" in out
    assert "route_to: gpt-4o-mini" in out and "block:    false" in out


def test_json_output_bare_ai_map(tmp_path: Path) -> None:
    path = sample(tmp_path, {"guardrails": {"flagged_count": 2}})
    code, out, _ = run(PolicyConfig(expression=EXPR), path, fmt="json")
    doc = json.loads(out)
    assert code == 0
    assert doc["block"] is True and doc["actions"] == ["block"] and doc["error"] is None


def test_eval_failure_shows_on_error_and_exits_2(tmp_path: Path) -> None:
    path = sample(tmp_path, {})
    code, out, err = run(PolicyConfig(expression="1 / 0", on_error=["block"]), path)
    assert code == 2
    assert "actions:  block" in out and "on_error: applied" in out
    assert err.startswith("error: policy failed on this sample")


@pytest.mark.parametrize(
    ("cfg", "doc", "message"),
    [
        (None, {}, "error: the config has no policy section"),
        (PolicyConfig(expression='"allow" +'), {}, "error: policy.expression: line 1, column 9"),
        (PolicyConfig(expression='"route_to:gpt-5"'), {}, "unknown model 'gpt-5'"),
        (
            PolicyConfig(expression='"allow"', on_error=["route_to:x"]),
            {},
            "error: policy.on_error[0]",
        ),
        (PolicyConfig(expression='"allow"'), {"budget": {"fraction": "high"}}, "expected a number"),
        (PolicyConfig(expression='"allow"'), {"modle": "x"}, "unknown field 'modle'"),
    ],
)
def test_errors_exit_2(tmp_path: Path, cfg: PolicyConfig | None, doc: object, message: str) -> None:
    code, _, err = run(cfg, sample(tmp_path, doc))
    assert code == 2
    assert message in err
    assert "Traceback" not in err


def test_unreadable_and_invalid_json(tmp_path: Path) -> None:
    cfg = PolicyConfig(expression='"allow"')
    code, _, err = run(cfg, tmp_path / "missing.json")
    assert code == 2 and "cannot read" in err
    bad = tmp_path / "bad.json"
    bad.write_text("{nope", encoding="utf-8")
    code, _, err = run(cfg, bad)
    assert code == 2 and "invalid JSON at line 1, column 2" in err


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="sbactor")
    add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def test_subcommand_with_yaml_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "gw.yaml"
    config.write_text(CONFIG, encoding="utf-8")
    path = sample(tmp_path, {"ai": {"budget": {"fraction": 0.99}}})
    args = parse(
        ["policy", "eval", "--config", str(config), "--input", str(path), "--format", "json"]
    )
    assert args.func(args) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["route_to"] == "gpt-4o-mini" and doc["sink_tag"] == "near-cap"

    args = parse(
        [
            "policy",
            "eval",
            "--config",
            str(config),
            "--input",
            str(path),
            "--expression",
            '"redact"',
        ]
    )
    assert args.func(args) == 0
    assert "actions:  redact" in capsys.readouterr().out


def test_subcommand_reports_bad_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "gw.yaml"
    config.write_text(CONFIG.replace("route_to:gpt-4o-mini", "route_to:gpt-9"), encoding="utf-8")
    args = parse(["policy", "eval", "--config", str(config), "--input", str(tmp_path / "x.json")])
    assert args.func(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "gpt-9" in err and "Traceback" not in err
