"""Config of the CEL policy plane: ``policy: {expression, on_error, max_expression_chars}``.

Only shape and token syntax are checked here; compiling the expression and checking model names
needs the whole config and happens in ``sbactor.policy.engine.check_policy``.
"""

from __future__ import annotations

from typing import Any

import attrs

from sbactor.policy.actions import PolicyEvalError, parse_token

#: Hard ceiling for ``max_expression_chars`` (a policy is a rule, not a program).
EXPRESSION_CHARS_CEILING = 65536


def _check_limit(_: Any, attribute: attrs.Attribute[int], value: int) -> None:
    if isinstance(value, bool) or not 64 <= value <= EXPRESSION_CHARS_CEILING:
        raise ValueError(f"must be between 64 and {EXPRESSION_CHARS_CEILING}")


def _default_on_error() -> list[str]:
    return ["allow"]


@attrs.frozen
class PolicyConfig:
    """One CEL expression over ``ai.*`` whose result is a list of actions."""

    expression: str = attrs.field()
    on_error: list[str] = attrs.field(factory=_default_on_error)
    max_expression_chars: int = attrs.field(default=4096, validator=_check_limit)

    @expression.validator
    def _check_expression(self, attribute: attrs.Attribute[str], value: str) -> None:
        if not value.strip():
            raise ValueError("must not be empty")
        if len(value) > self.max_expression_chars:
            raise ValueError(
                f"is {len(value)} characters long (max_expression_chars is "
                f"{self.max_expression_chars})"
            )

    @on_error.validator
    def _check_on_error(self, attribute: attrs.Attribute[list[str]], value: list[str]) -> None:
        if len(value) > 1 and all(isinstance(t, str) and len(t) == 1 for t in value):
            raise ValueError("must be a list of actions, e.g. [allow] or [block, 'audit:high']")
        for index, token in enumerate(value):
            try:
                parse_token(token)
            except PolicyEvalError as exc:
                raise ValueError(f"[{index}]: {exc}") from None
