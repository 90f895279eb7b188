"""Action parsing: the closed token set, result shapes and precedence."""

from __future__ import annotations

import pytest

from sbactor.policy.actions import (
    MAX_ACTIONS,
    Allow,
    Audit,
    Block,
    PolicyDecision,
    PolicyEvalError,
    Redact,
    RouteTo,
    SetSinkTag,
    parse_action_list,
    parse_actions,
    parse_token,
)
from sbactor.policy.config import PolicyConfig


@pytest.mark.parametrize(
    ("token", "action"),
    [
        ("allow", Allow()),
        ("block", Block()),
        ("redact", Redact()),
        ("route_to:gpt-4o-mini", RouteTo("gpt-4o-mini")),
        ("route_to:openai/gpt-4.1@eu", RouteTo("openai/gpt-4.1@eu")),
        ("set_sink_tag:beta", SetSinkTag("beta")),
        ("audit:low", Audit("low")),
        ("audit:medium", Audit("medium")),
        ("audit:high", Audit("high")),
    ],
)
def test_token_table(token: str, action: object) -> None:
    assert parse_token(token) == action


@pytest.mark.parametrize(
    "token",
    [
        "",
        "Allow",
        "blok",
        "block ",
        "route_to:",
        "route_to: x",
        "set_sink_tag:",
        "audit:critical",
        "audit:",
        "route_to:" + "m" * 200,
        "set_sink_tag:a b",
        "deny",
    ],
)
def test_unknown_tokens_raise(token: str) -> None:
    with pytest.raises(PolicyEvalError) as info:
        parse_token(token)
    assert info.value.kind == "unknown_action"


@pytest.mark.parametrize(
    ("result", "expected"),
    [
        ("allow", PolicyDecision(actions=("allow",))),
        ([], PolicyDecision()),
        (["allow", "block"], PolicyDecision(block=True, actions=("allow", "block"))),
        (
            ["route_to:a", "block", "redact"],
            PolicyDecision(
                block=True, redact=True, route_to="a", actions=("route_to:a", "block", "redact")
            ),
        ),
        (
            ["route_to:a", "route_to:b"],
            PolicyDecision(route_to="a", actions=("route_to:a", "route_to:b")),
        ),
        (
            ["set_sink_tag:x", "set_sink_tag:y"],
            PolicyDecision(sink_tag="x", actions=("set_sink_tag:x", "set_sink_tag:y")),
        ),
        (
            ["audit:low", "audit:high", "audit:medium"],
            PolicyDecision(audit="high", actions=("audit:low", "audit:high", "audit:medium")),
        ),
        (("redact",), PolicyDecision(redact=True, actions=("redact",))),
    ],
)
def test_result_table(result: object, expected: PolicyDecision) -> None:
    assert parse_actions(result) == expected


def test_block_wins_and_allowed_property() -> None:
    decision = parse_actions(["allow", "route_to:m", "block"])
    assert decision.block and not decision.allowed
    assert parse_actions("allow").allowed


@pytest.mark.parametrize("result", [5, 1.5, True, None, {"a": "allow"}, [["allow"]], ["allow", 3]])
def test_wrong_types(result: object) -> None:
    with pytest.raises(PolicyEvalError) as info:
        parse_actions(result)
    assert info.value.kind == "wrong_type"


def test_too_many_actions() -> None:
    with pytest.raises(PolicyEvalError):
        parse_actions(["allow"] * (MAX_ACTIONS + 1))


def test_action_list_for_on_error() -> None:
    assert parse_action_list(["block", "audit:high"]) == PolicyDecision(
        block=True, audit="high", actions=("block", "audit:high")
    )


def test_config_defaults_and_validation() -> None:
    cfg = PolicyConfig(expression='"allow"')
    assert cfg.on_error == ["allow"] and cfg.max_expression_chars == 4096
    with pytest.raises(ValueError, match="unknown action"):
        PolicyConfig(expression='"allow"', on_error=["deny"])
    with pytest.raises(ValueError, match="must be a list of actions"):
        PolicyConfig(expression='"allow"', on_error=list("allow"))
    with pytest.raises(ValueError, match="must not be empty"):
        PolicyConfig(expression="  ")
    with pytest.raises(ValueError, match="max_expression_chars"):
        PolicyConfig(expression='"' + "a" * 200 + '"', max_expression_chars=100)
    with pytest.raises(ValueError, match="between"):
        PolicyConfig(expression='"allow"', max_expression_chars=10)
