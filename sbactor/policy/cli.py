"""``sbactor policy eval``: run a policy on a sample activation, so operators test before deploying.

Exit codes: 0 the policy decided; 2 an operational error (bad config, policy does not compile,
unreadable sample) or the policy failed on the sample (the ``on_error`` actions are still shown,
because that is what the gateway would do).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Collection
from pathlib import Path
from typing import Any, TextIO

import attrs

from sbactor.policy.actions import PolicyDecision
from sbactor.policy.activation import ActivationError, activation_from_json
from sbactor.policy.config import PolicyConfig
from sbactor.policy.engine import (
    CompiledPolicy,
    PolicyCompileError,
    PolicyOutcome,
    check_on_error,
    check_policy,
)

__all__ = ["add_parser", "check_policy", "eval_command"]


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``policy eval`` on the root CLI's subparsers; returns the ``policy`` parser."""
    policy = subparsers.add_parser("policy", help="work with the CEL policy plane")
    sub = policy.add_subparsers(dest="policy_command", required=True)
    ev = sub.add_parser(
        "eval",
        help="print the actions a policy returns for a sample activation",
        description="Evaluate the config's policy on a JSON sample of the ai.* map "
        "(partial samples are filled with neutral values).",
    )
    ev.add_argument("--config", required=True, help="gateway config file (YAML)")
    ev.add_argument("--input", required=True, help="activation JSON: {\"ai\": {...}} or the ai map")
    ev.add_argument("--expression", help="evaluate this expression instead of the config's")
    ev.add_argument("--format", choices=("text", "json"), default="text")
    ev.set_defaults(func=_run)
    return policy


def _run(args: argparse.Namespace) -> int:
    from sbactor.config import ConfigError, load_config

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        first = exc.problems[0] if exc.problems else str(exc)
        more = f" (and {len(exc.problems) - 1} more problems)" if len(exc.problems) > 1 else ""
        return _fail(f"{args.config}: {first}{more}")
    policy_cfg: PolicyConfig | None = config.policy
    if args.expression is not None:
        base = policy_cfg or PolicyConfig(expression=args.expression)
        try:
            policy_cfg = attrs.evolve(base, expression=args.expression)
        except ValueError as exc:
            return _fail(f"--expression: {exc}")
    models = {m.name for m in config.models}
    return eval_command(policy_cfg, models, args.input, fmt=args.format)


def _fail(message: str, err: TextIO | None = None) -> int:
    print(f"error: {message.splitlines()[0]}", file=err or sys.stderr)
    rest = message.splitlines()[1:]
    for line in rest:
        print(line, file=err or sys.stderr)
    return 2


def eval_command(
    policy_cfg: PolicyConfig | None,
    known_models: Collection[str],
    activation_path: str | Path,
    *,
    fmt: str = "text",
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """Compile ``policy_cfg``, evaluate it on the JSON sample, print the decision; 0 ok, 2 error."""
    out = out or sys.stdout
    if policy_cfg is None:
        return _fail("the config has no policy section (add policy: {expression: ...})", err)
    problems = [f"policy.{p}" for p in check_on_error(policy_cfg, known_models)]
    try:
        policy = CompiledPolicy.compile(policy_cfg, known_models)
    except PolicyCompileError as exc:
        problems.insert(0, f"policy.expression: {exc}")
    if problems:
        return _fail("\n".join(problems), err)
    try:
        document = json.loads(Path(activation_path).read_text(encoding="utf-8"))
    except OSError as exc:
        return _fail(f"{activation_path}: cannot read: {exc.strerror or exc}", err)
    except json.JSONDecodeError as exc:
        where = f"line {exc.lineno}, column {exc.colno}"
        return _fail(f"{activation_path}: invalid JSON at {where}: {exc.msg}", err)
    try:
        activation = activation_from_json(document)
    except ActivationError as exc:
        return _fail(f"{activation_path}: {exc}", err)
    outcome = policy.evaluate(activation)
    _print(outcome, fmt, out)
    if outcome.applied_on_error:
        return _fail(f"policy failed on this sample ({outcome.error}); on_error applied", err)
    return 0


def decision_dict(decision: PolicyDecision) -> dict[str, Any]:
    return {
        "actions": list(decision.actions),
        "block": decision.block,
        "redact": decision.redact,
        "route_to": decision.route_to,
        "sink_tag": decision.sink_tag,
        "audit": decision.audit,
    }


def _print(outcome: PolicyOutcome, fmt: str, out: TextIO) -> None:
    doc = decision_dict(outcome.decision)
    if fmt == "json":
        doc["error"] = outcome.error
        doc["error_kind"] = outcome.error_kind
        doc["applied_on_error"] = outcome.applied_on_error
        print(json.dumps(doc), file=out)
        return
    actions = ", ".join(outcome.decision.actions) or "(none: allow)"
    print(f"actions:  {actions}", file=out)
    for key in ("block", "redact", "route_to", "sink_tag", "audit"):
        value = doc[key]
        shown = str(value).lower() if isinstance(value, bool) else (value or "-")
        print(f"{key + ':':<9} {shown}", file=out)
    if outcome.applied_on_error:
        print(f"on_error: applied ({outcome.error_kind}: {outcome.error})", file=out)
