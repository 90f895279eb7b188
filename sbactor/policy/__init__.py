"""The CEL policy plane: one sandboxed expression over ``ai.*`` returning a closed action set."""

from sbactor.policy.actions import (
    ALLOW,
    Action,
    Allow,
    Audit,
    Block,
    PolicyDecision,
    PolicyEvalError,
    Redact,
    RouteTo,
    SetSinkTag,
    parse_actions,
)
from sbactor.policy.activation import (
    ActivationError,
    activation_from_json,
    build_activation,
    neutral_activation,
)
from sbactor.policy.config import PolicyConfig
from sbactor.policy.engine import (
    CompiledPolicy,
    PolicyCompileError,
    PolicyOutcome,
    PolicyStatistics,
    check_on_error,
    check_policy,
)

__all__ = [
    "ALLOW",
    "Action",
    "ActivationError",
    "Allow",
    "Audit",
    "Block",
    "CompiledPolicy",
    "PolicyCompileError",
    "PolicyConfig",
    "PolicyDecision",
    "PolicyEvalError",
    "PolicyOutcome",
    "PolicyStatistics",
    "Redact",
    "RouteTo",
    "SetSinkTag",
    "activation_from_json",
    "build_activation",
    "check_on_error",
    "check_policy",
    "neutral_activation",
    "parse_actions",
]
