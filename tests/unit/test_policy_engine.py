"""Compiling and evaluating policies: positions, static checks, on_error per failure kind."""

from __future__ import annotations

from typing import Any

import pytest

from sbactor.policy.activation import (
    MAX_LIST_ITEMS,
    MAX_STRING_CHARS,
    ActivationError,
    activation_from_json,
    build_activation,
    neutral_activation,
)
from sbactor.policy.config import PolicyConfig
from sbactor.policy.engine import (
    CompiledPolicy,
    PolicyCompileError,
    check_on_error,
    check_policy,
)

MODELS = {"gpt-4o", "gpt-4o-mini", "claude-sonnet"}

FIVE_CLAUSES = """
ai.guardrails.flagged_count >= 2 ? "block" :
ai.budget.fraction > 0.9 ? ["route_to:gpt-4o-mini", "audit:medium"] :
ai.principal.tier == "free" && ai.tokens.input_est > 4000 ? "route_to:gpt-4o-mini" :
"beta" in ai.principal.tags ? ["set_sink_tag:beta", "audit:low"] :
ai.guardrails.flagged ? "redact" : "allow"
"""


def compiled(expression: str, on_error: list[str] | None = None) -> CompiledPolicy:
    cfg = PolicyConfig(expression=expression, on_error=on_error or ["allow"])
    return CompiledPolicy.compile(cfg, MODELS)


def act(**pieces: Any) -> dict[str, Any]:
    return build_activation(**pieces)


# --- activation ----------------------------------------------------------------------------


def test_neutral_activation_shape_and_evaluates() -> None:
    ai = neutral_activation()["ai"]
    assert ai["surface"] == "chat" and ai["model"] == ""
    assert ai["guardrails"] == {"flagged": False, "flagged_count": 0, "labels": [], "verdicts": []}
    assert ai["budget"] == {"fraction": 0.0, "exceeded": False, "forecast_fraction": 0.0}
    outcome = compiled(FIVE_CLAUSES).evaluate(neutral_activation())
    assert outcome.error is None and outcome.decision.actions == ("allow",)


def test_build_activation_fills_and_coerces() -> None:
    ai = act(budget={"fraction": 1}, principal={"user": "alice"})["ai"]
    assert ai["budget"]["fraction"] == 1.0 and isinstance(ai["budget"]["fraction"], float)
    assert ai["principal"] == {"key_id": "", "user": "alice", "team": "", "tier": "", "tags": []}
    with pytest.raises(ActivationError, match="unknown field 'fracton'"):
        act(budget={"fracton": 0.5})
    with pytest.raises(ActivationError, match="expected an integer"):
        act(tokens={"input_est": "12"})


def test_int_budget_fraction_still_compares_with_double() -> None:
    outcome = compiled('ai.budget.fraction >= 1.0 ? "block" : "allow"').evaluate(
        act(budget={"fraction": 1})
    )
    assert outcome.decision.block and outcome.error is None


def test_activation_from_json_accepts_both_shapes() -> None:
    a = activation_from_json({"ai": {"model": "gpt-4o"}})
    b = activation_from_json({"model": "gpt-4o"})
    assert a == b and a["ai"]["route"] == {"model": "", "provider": ""}
    with pytest.raises(ActivationError):
        activation_from_json({"modle": "x"})


# --- typical expressions ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pieces", "actions"),
    [
        ({"guardrails": {"flagged_count": 3, "flagged": True}}, ("block",)),
        ({"budget": {"fraction": 0.95}}, ("route_to:gpt-4o-mini", "audit:medium")),
        ({"principal": {"tier": "free"}, "tokens": {"input_est": 5000}}, ("route_to:gpt-4o-mini",)),
        ({"principal": {"tags": ["x", "beta"]}}, ("set_sink_tag:beta", "audit:low")),
        ({"guardrails": {"flagged": True, "flagged_count": 1}}, ("redact",)),
        ({}, ("allow",)),
    ],
)
def test_five_clause_policy(pieces: dict[str, Any], actions: tuple[str, ...]) -> None:
    outcome = compiled(FIVE_CLAUSES).evaluate(act(**pieces))
    assert outcome.error is None
    assert outcome.decision.actions == actions


@pytest.mark.parametrize(
    ("expression", "pieces", "actions"),
    [
        (
            'ai.guardrails.verdicts.exists(v, v.label == "pii" && v.score > 0.5)'
            ' ? "redact" : "allow"',
            {"guardrails": {"verdicts": [{"label": "pii", "score": 0.9}]}},
            ("redact",),
        ),
        (
            'ai.principal.tags.map(t, "set_sink_tag:" + t)',
            {"principal": {"tags": ["a", "b"]}},
            ("set_sink_tag:a", "set_sink_tag:b"),
        ),
        (
            '"route_to:" + ai.route.model',
            {"route": {"model": "claude-sonnet"}},
            ("route_to:claude-sonnet",),
        ),
        (
            'ai.request.stream && ai.model.startsWith("gpt") ? ["audit:low"] : []',
            {"model": "gpt-4o", "request": {"stream": True}},
            ("audit:low",),
        ),
        (
            'has(ai.principal.team) && size(ai.principal.tags) == 0 ? "allow" : "block"',
            {},
            ("allow",),
        ),
        ('type(ai.model) == string ? "allow" : "block"', {}, ("allow",)),
        ('ai.surface in ["chat", "embeddings"] ? "allow" : "block"', {}, ("allow",)),
    ],
)
def test_expression_features(
    expression: str, pieces: dict[str, Any], actions: tuple[str, ...]
) -> None:
    outcome = compiled(expression).evaluate(act(**pieces))
    assert outcome.error is None, outcome.error
    assert outcome.decision.actions == actions


def test_has_result_usable_in_conditional() -> None:
    # cel-python 0.5 alone fails this with "no such overload"; the fast path fixes has().
    outcome = compiled('has(ai.principal.team) && true ? "redact" : "allow"').evaluate(act())
    assert outcome.error is None and outcome.decision.redact


def test_fast_path_matches_celpy_runner() -> None:
    policy = compiled(FIVE_CLAUSES)
    assert policy.statistics().fast_path
    from sbactor.policy.activation import to_cel

    for pieces in ({}, {"budget": {"fraction": 0.95}}, {"principal": {"tags": ["beta"]}}):
        context = to_cel(act(**pieces))
        assert policy._fast is not None
        assert policy._fast(context) == policy._runner.evaluate(context)


# --- compile errors --------------------------------------------------------------------------


def compile_error(expression: str) -> str:
    with pytest.raises(PolicyCompileError) as info:
        compiled(expression)
    return str(info.value)


def test_syntax_error_has_position_and_caret() -> None:
    message = compile_error('ai.model == "x" ?\n  "block" : ')
    assert message.startswith("line 2, column 11: syntax error: unexpected end of expression")
    assert message.splitlines()[1] == '      "block" : '
    assert message.splitlines()[-1] == "    " + " " * 10 + "^"
    message = compile_error('ai.model = "x"')
    assert message.startswith("line 1, column 10: syntax error")


def test_unexpected_character_position() -> None:
    assert compile_error("ai.$x").startswith(
        "line 1, column 4: syntax error: unexpected character '$'"
    )


def test_literal_unknown_route_to_is_compile_error() -> None:
    message = compile_error('ai.model == "a" ? "route_to:gpt-5" : "allow"')
    assert "line 1, column 19" in message and "unknown model 'gpt-5'" in message
    assert "gpt-4o-mini" in message  # lists known models


def test_literal_bad_action_token_is_compile_error() -> None:
    assert "audit level" in compile_error('["allow", "audit:critical"]')


def test_unknown_function_and_identifier() -> None:
    assert "unknown function 'now'" in compile_error('now() > 1 ? "block" : "allow"')
    assert "unknown identifier 'ia'" in compile_error('ia.model == "x" ? "block" : "allow"')


def test_malformed_macro_is_compile_error() -> None:
    assert "invalid expression" in compile_error("ai.principal.tags.exists(t)")


def test_expression_length_capped() -> None:
    cfg = PolicyConfig(expression='"allow"', max_expression_chars=64)
    long_cfg = PolicyConfig(expression='"' + "a" * 100 + '"', max_expression_chars=4096)
    assert check_policy(cfg, MODELS) == []
    import attrs

    with pytest.raises(ValueError):
        attrs.evolve(long_cfg, max_expression_chars=64)


def test_check_policy_and_on_error() -> None:
    assert check_policy(PolicyConfig(expression=FIVE_CLAUSES), MODELS) == []
    assert check_policy(PolicyConfig(expression='"route_to:nope"'), MODELS)
    cfg = PolicyConfig(expression='"allow"', on_error=["route_to:nope", "audit:low"])
    assert check_on_error(cfg, MODELS) == [
        "on_error[0]: route_to names an unknown model 'nope' (known: claude-sonnet, gpt-4o, "
        "gpt-4o-mini)"
    ]


def test_concatenated_route_to_prefix_is_runtime_checked() -> None:
    policy = compiled('"route_to:" + ai.principal.team')
    outcome = policy.evaluate(act(principal={"team": "research"}))
    assert outcome.applied_on_error and outcome.error_kind == "unknown_model"


# --- on_error per failure kind ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("expression", "kind", "fragment"),
    [
        ("ai.tokens.max_output / 0 == 1 ? 'block' : 'allow'", "eval_error", "evaluation error"),
        ("ai.tokens.max_output / 0", "eval_error", "divide by zero"),
        ("ai.principal.missing", "eval_error", "no such member"),
        ("ai.principal.missing == 'x' ? 'block' : 'allow'", "eval_error", "evaluation error"),
        ("ai.tokens.input_est > 1.5 ? 'block' : 'allow'", "eval_error", "no such overload"),
        ("5", "wrong_type", "got an int"),
        ("ai.request.stream", "wrong_type", "got a bool"),
        ('["allow", 1]', "wrong_type", "list items must be strings"),
        ('"blok"', "unknown_action", "unknown action 'blok'"),
        ('ai.model == "" ? "deny" : "allow"', "unknown_action", "unknown action 'deny'"),
        ('"route_to:" + "gpt-5"', "unknown_model", "unknown model 'gpt-5'"),
    ],
)
def test_on_error_applied(expression: str, kind: str, fragment: str) -> None:
    policy = compiled(expression, on_error=["block", "audit:high"])
    outcome = policy.evaluate(neutral_activation())
    assert outcome.applied_on_error
    assert outcome.error_kind == kind
    assert fragment in (outcome.error or "")
    assert outcome.decision.block and outcome.decision.audit == "high"
    stats = policy.statistics()
    assert stats.evaluations == 1 and stats.errors == 1 and stats.errors_by_kind == {kind: 1}


def test_on_error_defaults_to_allow() -> None:
    outcome = compiled("1 / 0").evaluate(neutral_activation())
    assert outcome.applied_on_error and outcome.decision.allowed
    assert outcome.decision.actions == ("allow",)


def test_runtime_known_models_override() -> None:
    policy = compiled('"route_to:" + ai.route.model')
    sample = act(route={"model": "new-model"})
    assert policy.evaluate(sample).applied_on_error
    outcome = policy.evaluate(sample, known_models={"new-model"})
    assert outcome.decision.route_to == "new-model" and type(outcome.decision.route_to) is str


def test_oversize_activation_applies_on_error() -> None:
    policy = compiled('"allow"', on_error=["block"])
    huge = act(principal={"user": "x" * (MAX_STRING_CHARS + 1)})
    outcome = policy.evaluate(huge)
    assert outcome.error_kind == "activation" and outcome.decision.block
    many = act(guardrails={"verdicts": [{"label": "pii"}] * (MAX_LIST_ITEMS + 1)})
    assert policy.evaluate(many).error_kind == "activation"
    deep: Any = "x"
    for _ in range(10):
        deep = [deep]
    assert policy.evaluate(act(guardrails={"verdicts": deep})).error_kind == "activation"
