"""The closed action set a policy expression may return, and its parsing into one decision.

A policy returns a string or a list of strings; each string is one token from a closed set. Keeping
the set closed (and parsing it strictly) means a typo in a policy is an error that ``on_error``
handles and /metrics counts, never a silently ignored rule.

Precedence: ``block`` wins over everything; the first ``route_to`` and the first ``set_sink_tag``
win; ``audit`` keeps the highest level seen; an empty list means allow.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Literal

import attrs

AuditLevel = Literal["low", "medium", "high"]
AUDIT_LEVELS: tuple[AuditLevel, ...] = ("low", "medium", "high")

#: Most actions one result may carry (a guard against runaway ``map()`` results).
MAX_ACTIONS = 32
#: Longest model name / sink tag accepted in a token.
MAX_ARGUMENT_CHARS = 128

_ARGUMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]*$")

ACTION_SYNTAX = (
    "allow, block, redact, route_to:<model>, set_sink_tag:<tag>, audit:<low|medium|high>"
)


class PolicyEvalError(ValueError):
    """A policy result that cannot be turned into a decision (the caller applies ``on_error``)."""

    def __init__(self, message: str, kind: str = "eval_error") -> None:
        super().__init__(message)
        self.kind = kind


@attrs.frozen
class Allow:
    pass


@attrs.frozen
class Block:
    reason: str | None = None


@attrs.frozen
class Redact:
    pass


@attrs.frozen
class RouteTo:
    model: str


@attrs.frozen
class SetSinkTag:
    tag: str


@attrs.frozen
class Audit:
    level: AuditLevel


Action = Allow | Block | Redact | RouteTo | SetSinkTag | Audit


@attrs.frozen
class PolicyDecision:
    """What the gateway does with one request; ``actions`` keeps the raw tokens for audit."""

    block: bool = False
    redact: bool = False
    route_to: str | None = None
    sink_tag: str | None = None
    audit: AuditLevel | None = None
    actions: tuple[str, ...] = ()

    @property
    def allowed(self) -> bool:
        return not self.block


ALLOW = PolicyDecision()


def _argument(token: str, prefix: str, what: str) -> str:
    value = token[len(prefix) :]
    if not value:
        raise PolicyEvalError(f"action {token!r} needs a {what} after {prefix!r}", "unknown_action")
    if len(value) > MAX_ARGUMENT_CHARS or not _ARGUMENT.match(value):
        raise PolicyEvalError(
            f"action {_clip(token)!r}: {what} must be 1-{MAX_ARGUMENT_CHARS} characters of "
            "letters, digits and ._:/@+- (starting with a letter or digit)",
            "unknown_action",
        )
    return value


def parse_token(token: str) -> Action:
    """One token into a typed action; anything outside the closed set raises PolicyEvalError."""
    token = str(token)  # CEL StringType -> plain str, so decisions hold plain values
    if token == "allow":
        return Allow()
    if token == "block":
        return Block()
    if token == "redact":
        return Redact()
    if token.startswith("route_to:"):
        return RouteTo(_argument(token, "route_to:", "model name"))
    if token.startswith("set_sink_tag:"):
        return SetSinkTag(_argument(token, "set_sink_tag:", "tag"))
    if token.startswith("audit:"):
        level = token[len("audit:") :]
        for known in AUDIT_LEVELS:
            if level == known:
                return Audit(known)
        raise PolicyEvalError(
            f"action {_clip(token)!r}: audit level must be low, medium or high", "unknown_action"
        )
    raise PolicyEvalError(
        f"unknown action {_clip(token)!r} (expected one of: {ACTION_SYNTAX})", "unknown_action"
    )


def _clip(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool) or type(value).__name__ == "BoolType":
        value = bool(value)
        return f"a bool ({str(value).lower()})"
    if isinstance(value, int):
        return f"an int ({value})"
    if isinstance(value, float):
        return f"a double ({value})"
    if isinstance(value, dict):
        return "a map"
    if isinstance(value, list | tuple):
        return "a list"
    return f"a {type(value).__name__}"


def parse_actions(result: Any) -> PolicyDecision:
    """A policy result (string or list of strings) into one decision, applying precedence."""
    tokens: Sequence[Any]
    if isinstance(result, str):
        tokens = (result,)
    elif isinstance(result, list | tuple):
        tokens = result
    else:
        raise PolicyEvalError(
            f"policy must return a string or a list of strings, got {_describe(result)}",
            "wrong_type",
        )
    if len(tokens) > MAX_ACTIONS:
        raise PolicyEvalError(
            f"policy returned {len(tokens)} actions (at most {MAX_ACTIONS})", "wrong_type"
        )
    return decide([_typed(t) for t in tokens], tuple(str(t) for t in tokens))


def _typed(token: Any) -> Action:
    if isinstance(token, BaseException):
        raise PolicyEvalError(f"evaluation error in list item: {token}", "eval_error")
    if not isinstance(token, str):
        raise PolicyEvalError(
            f"policy list items must be strings, got {_describe(token)}", "wrong_type"
        )
    return parse_token(token)


def decide(actions: Sequence[Action], raw: tuple[str, ...] = ()) -> PolicyDecision:
    """Fold typed actions into a decision: block wins, first route_to / tag wins, highest audit."""
    block = redact = False
    route_to: str | None = None
    sink_tag: str | None = None
    audit: AuditLevel | None = None
    for action in actions:
        if isinstance(action, Block):
            block = True
        elif isinstance(action, Redact):
            redact = True
        elif isinstance(action, RouteTo):
            route_to = route_to or action.model
        elif isinstance(action, SetSinkTag):
            sink_tag = sink_tag or action.tag
        elif isinstance(action, Audit):
            if audit is None or AUDIT_LEVELS.index(action.level) > AUDIT_LEVELS.index(audit):
                audit = action.level
    return PolicyDecision(
        block=block, redact=redact, route_to=route_to, sink_tag=sink_tag, audit=audit, actions=raw
    )


def parse_action_list(tokens: Sequence[str]) -> PolicyDecision:
    """A config-time list (``on_error``) into a decision; raises PolicyEvalError on a bad token."""
    return decide([parse_token(t) for t in tokens], tuple(tokens))
