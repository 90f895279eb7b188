"""Compile a policy once at config load; evaluate it per request into a typed decision.

Sync and I/O-free. Every CEL environment in the process uses ``celpy.CompiledRunner``: cel-python's
parser is a process-wide singleton built for the first runner class, and mixing classes breaks it.

Speed: cel-python's own ``Runner.evaluate`` clones an ``Activation`` and resolves names through
typing-heavy containers (~150 us for a 5-clause policy). We run the same transpiled code with a
minimal activation that looks variables up in a dict and defers anything else (type names) to
celpy's own activation, so semantics stay celpy's. If the transpiled text ever has a shape we do
not recognise, we fall back to ``Runner.evaluate``.

Sandbox: no functions beyond CEL's standard, side-effect-free set are bound; calls to any other
function are a compile error; expression length and activation size are capped.
"""

from __future__ import annotations

import ast
import operator
import re
from collections import Counter
from collections.abc import Callable, Collection, Mapping
from typing import Any

import attrs
import celpy
import celpy.evaluation
import lark

from sbactor.policy.actions import (
    PolicyDecision,
    PolicyEvalError,
    RouteTo,
    parse_action_list,
    parse_actions,
    parse_token,
)
from sbactor.policy.activation import ActivationError, to_cel
from sbactor.policy.config import PolicyConfig

_MACROS = frozenset({"has", "dyn", "exists", "all", "exists_one", "map", "filter"})
_KNOWN_FUNCTIONS = frozenset(celpy.evaluation.base_functions) | _MACROS
_TYPE_NAMES = frozenset(
    {"int", "uint", "double", "bool", "string", "bytes", "list", "map", "null_type", "type"}
)
_ACTION_PREFIXES = ("route_to:", "set_sink_tag:", "audit:")

_ENV: celpy.Environment | None = None


def _environment() -> celpy.Environment:
    global _ENV
    if _ENV is None:
        _ENV = celpy.Environment(runner_class=celpy.CompiledRunner)
    return _ENV


class PolicyCompileError(ValueError):
    """A policy that cannot be used; the message carries the CEL position and a caret excerpt."""


@attrs.frozen
class PolicyOutcome:
    decision: PolicyDecision
    error: str | None = None
    # eval_error | wrong_type | unknown_action | unknown_model | activation
    error_kind: str | None = None
    applied_on_error: bool = False


@attrs.frozen
class PolicyStatistics:
    evaluations: int
    errors: int
    errors_by_kind: dict[str, int]
    fast_path: bool


class _FastActivation:
    """The subset of ``celpy.Activation`` that transpiled code touches, with dict lookups."""

    __slots__ = ("_base", "_vars")

    def __init__(self, variables: dict[str, Any], base: celpy.Activation) -> None:
        self._vars = variables
        self._base = base

    def __getattr__(self, name: str) -> Any:
        try:
            return self._vars[name]
        except KeyError:
            return getattr(self._base, name)

    def resolve_variable(self, name: str) -> Any:
        if name in self._vars:
            return self._vars[name]
        return self._base.resolve_variable(name)

    def nested_activation(
        self, annotations: Any = None, vars: Mapping[str, Any] | None = None
    ) -> _FastActivation:
        return _FastActivation({**self._vars, **(vars or {})}, self._base)


_LITERAL = re.compile(
    r"celpy\.celtypes\.(IntType|UintType|DoubleType|StringType|BoolType)\("
    r"(-?[0-9][0-9.eE+-]*|'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"|True|False)\)"
)


# cel-python 0.5 makes has() a Python bool, which ``?:`` then rejects ("no such overload").
_HAS = re.compile(
    r"^(ex_\d+ = lambda activation: )"
    r"(not isinstance\(celpy\.evaluation\.result\(activation, ex_\d+_h\), CELEvalError\))$",
    re.M,
)


def _operator_in(item: Any, container: Any) -> Any:
    """celpy's ``operator_in`` minus a runtime ``typing.cast(Iterable[...])`` that costs ~10 us."""
    if isinstance(item, celpy.CELEvalError):
        return item
    if isinstance(container, celpy.CELEvalError):
        return container
    result_value: Any = celpy.celtypes.BoolType(False)
    for candidate in container:
        try:
            if candidate == item:
                return celpy.celtypes.BoolType(True)
        except TypeError as ex:
            result_value = celpy.CELEvalError("no such overload", ex.__class__, ex.args)
    return result_value


def _cached_operators() -> dict[str, Any]:
    """celpy builds a ``functools.wraps`` wrapper per comparison; build each once instead."""
    boolean = celpy.evaluation.boolean
    ops = {name: boolean(getattr(operator, name)) for name in ("eq", "ne", "lt", "le", "gt", "ge")}
    calls = {
        f"celpy.evaluation.bool_{name}(": (f"_sbactor_bool_{name}", fn) for name, fn in ops.items()
    }
    calls["celpy.evaluation.operator_in("] = ("_sbactor_operator_in", _operator_in)
    return calls


_CALLS = _cached_operators()


def _rewrite_calls(source: str, namespace: dict[str, Any]) -> str:
    for call, (name, fn) in _CALLS.items():
        if call in source:
            namespace[name] = fn
            source = source.replace(call, name + "(")
    return source


def _hoist_literals(source: str, namespace: dict[str, Any]) -> str:
    """Build each CEL literal once: celpy rebuilds them per evaluation (IntType() costs ~9 us)."""

    def hoist(match: re.Match[str]) -> str:
        try:
            value = getattr(celpy.celtypes, match.group(1))(ast.literal_eval(match.group(2)))
        except Exception:
            return match.group(0)
        name = f"_sbactor_literal_{len(namespace)}"
        namespace[name] = value
        return name

    return _LITERAL.sub(hoist, source)


def _fast_evaluator(runner: Any) -> Callable[[dict[str, Any]], Any] | None:
    """Re-host the runner's transpiled code; None if it is not in the shape we know."""
    try:
        source: str = runner.tp.source_text
        base: celpy.Activation = runner.tp.base_activation
    except AttributeError:
        return None
    lines = source.rstrip().splitlines()
    prefix = "CEL = "
    if not lines or not lines[-1].startswith(prefix):
        return None
    namespace = dict(vars(celpy.evaluation))
    body = _HAS.sub(r"\1celpy.celtypes.BoolType(\2)", "\n".join(lines[:-1]))
    body = _hoist_literals(body, namespace)
    body, last_src = _rewrite_calls(body, namespace), lines[-1][len(prefix) :]
    last = _rewrite_calls(_hoist_literals(last_src, namespace), namespace)
    try:
        exec(compile(body, "<policy>", "exec"), namespace)
        top = eval(compile(f"lambda base_activation: {last}", "<policy>", "eval"), namespace)
    except Exception:
        return None

    def evaluate(context: dict[str, Any]) -> Any:
        return top(_FastActivation(context, base))

    return evaluate


def _format_position(expression: str, line: int, column: int, message: str) -> str:
    lines = expression.splitlines() or [""]
    source = lines[line - 1] if 0 < line <= len(lines) else ""
    return f"line {line}, column {column}: {message}\n    {source}\n    {' ' * (column - 1)}^"


def _syntax_message(exc: celpy.CELParseError) -> str:
    cause = exc.__context__
    if isinstance(cause, lark.exceptions.UnexpectedCharacters):
        return f"syntax error: unexpected character {cause.char!r}"
    if isinstance(cause, lark.exceptions.UnexpectedToken):
        if cause.token.type == "$END":
            return "syntax error: unexpected end of expression"
        return f"syntax error: unexpected {cause.token.value!r}"
    return "syntax error"


def _sole_literal(node: Any) -> lark.Tree | None:
    while isinstance(node, lark.Tree):
        if node.data == "literal":
            return node
        if len(node.children) != 1:
            return None
        node = node.children[0]
    return None


def _check_tree(tree: lark.Tree, expression: str, known_models: Collection[str]) -> list[str]:
    """Static checks: unknown functions / identifiers, literal action tokens, route_to models."""
    problems: list[str] = []

    def at(token: Any, message: str) -> None:
        line, column = getattr(token, "line", None) or 1, getattr(token, "column", None) or 1
        problems.append(_format_position(expression, line, column, message))

    concatenated: set[int] = set()
    bound: set[str] = set()
    for node in tree.iter_subtrees():
        if node.data == "addition" and len(node.children) == 2:
            left = node.children[0]
            if isinstance(left, lark.Tree) and left.children:
                for operand in (left.children[0], node.children[1]):
                    literal = _sole_literal(operand)
                    if literal is not None:
                        concatenated.add(id(literal))
        elif node.data == "member_dot_arg" and len(node.children) >= 3:
            name = node.children[1]
            if str(name) in _MACROS and isinstance(node.children[2], lark.Tree):
                args = node.children[2].children
                first = _sole_literal(args[0]) if args else None
                ident = args[0] if first is None else None
                while isinstance(ident, lark.Tree) and ident.data != "ident":
                    ident = ident.children[0] if len(ident.children) == 1 else None
                if isinstance(ident, lark.Tree):
                    bound.add(str(ident.children[0]))
    for node in tree.iter_subtrees_topdown():
        if node.data == "ident_arg" or node.data == "member_dot_arg":
            name = node.children[0] if node.data == "ident_arg" else node.children[1]
            if str(name) not in _KNOWN_FUNCTIONS:
                at(name, f"unknown function {str(name)!r}")
        elif node.data == "ident":
            name = node.children[0]
            if str(name) != "ai" and str(name) not in bound and str(name) not in _TYPE_NAMES:
                at(name, f"unknown identifier {str(name)!r} (the policy sees only 'ai')")
        elif node.data == "literal" and id(node) not in concatenated:
            token = node.children[0]
            if getattr(token, "type", "") not in ("STRING_LIT", "MLSTRING_LIT"):
                continue
            value = str(celpy.evaluation.celstr(token))
            if not value.startswith(_ACTION_PREFIXES):
                continue
            try:
                action = parse_token(value)
            except PolicyEvalError as exc:
                at(token, str(exc))
                continue
            if isinstance(action, RouteTo) and action.model not in known_models:
                at(token, f"route_to names an unknown model {action.model!r}{_known(known_models)}")
    return problems


def _known(models: Collection[str]) -> str:
    return f" (known: {', '.join(sorted(models))})" if models else " (no models configured)"


class CompiledPolicy:
    """A policy ready to evaluate; build with ``CompiledPolicy.compile``."""

    def __init__(
        self,
        config: PolicyConfig,
        runner: celpy.Runner,
        known_models: frozenset[str],
        on_error: PolicyDecision,
    ) -> None:
        self.config = config
        self.known_models = known_models
        self.on_error = on_error
        self._runner = runner
        self._fast = _fast_evaluator(runner)
        self._evaluations = 0
        self._errors: Counter[str] = Counter()

    @classmethod
    def compile(cls, cfg: PolicyConfig, known_models: Collection[str]) -> CompiledPolicy:
        """Parse, check and transpile; raises PolicyCompileError listing every problem."""
        problems = compile_problems(cfg, known_models)
        if problems:
            raise PolicyCompileError("\n".join(problems))
        env = _environment()
        runner = env.program(env.compile(cfg.expression))
        return cls(cfg, runner, frozenset(known_models), parse_action_list(cfg.on_error))

    def _run(self, context: dict[str, Any]) -> Any:
        if self._fast is not None:
            return self._fast(context)
        return self._runner.evaluate(context)

    def evaluate(
        self, activation: Mapping[str, Any], *, known_models: Collection[str] | None = None
    ) -> PolicyOutcome:
        """The decision for one request; any failure yields the ``on_error`` decision instead."""
        self._evaluations += 1
        models = self.known_models if known_models is None else known_models
        try:
            context = to_cel(activation)
        except ActivationError as exc:
            return self._failed("activation", f"activation rejected: {exc}")
        try:
            value = self._run(context)
        except Exception as exc:  # celpy raises CELEvalError, and Python errors for edge cases
            return self._failed("eval_error", f"evaluation error: {_eval_message(exc)}")
        if isinstance(value, celpy.CELEvalError):
            return self._failed("eval_error", f"evaluation error: {_eval_message(value)}")
        try:
            decision = parse_actions(value)
        except PolicyEvalError as exc:
            return self._failed(exc.kind, str(exc))
        if decision.route_to is not None and decision.route_to not in models:
            return self._failed(
                "unknown_model",
                f"route_to names an unknown model {decision.route_to!r}{_known(models)}",
            )
        return PolicyOutcome(decision)

    def _failed(self, kind: str, message: str) -> PolicyOutcome:
        self._errors[kind] += 1
        return PolicyOutcome(self.on_error, error=message, error_kind=kind, applied_on_error=True)

    def statistics(self) -> PolicyStatistics:
        return PolicyStatistics(
            evaluations=self._evaluations,
            errors=sum(self._errors.values()),
            errors_by_kind=dict(self._errors),
            fast_path=self._fast is not None,
        )


def _eval_message(exc: BaseException) -> str:
    """celpy nests its errors as args; surface the innermost human message."""
    args = exc.args
    if args and args[0] == "evaluation error" and len(args) >= 3:
        inner = args[2]
        if isinstance(inner, tuple) and inner and isinstance(inner[0], str):
            return inner[0]
    if args and isinstance(args[0], str):
        return args[0]
    return type(exc).__name__


def compile_problems(cfg: PolicyConfig, known_models: Collection[str]) -> list[str]:
    """Every reason ``cfg.expression`` cannot be used (empty list: it compiles)."""
    expression = cfg.expression
    if len(expression) > cfg.max_expression_chars:
        return [
            f"expression is {len(expression)} characters long "
            f"(max_expression_chars is {cfg.max_expression_chars})"
        ]
    env = _environment()
    try:
        tree = env.compile(expression)
    except celpy.CELParseError as exc:
        return [_format_position(expression, exc.line or 1, exc.column or 1, _syntax_message(exc))]
    except RecursionError:
        return ["expression is nested too deeply"]
    problems = _check_tree(tree, expression, known_models)
    if problems:
        return problems
    try:
        env.program(tree)
    except Exception as exc:  # celpy's transpiler raises bare errors for malformed macros
        return [f"invalid expression ({type(exc).__name__}: {exc}); check macro arguments"]
    return []


def check_policy(cfg: PolicyConfig, known_models: Collection[str]) -> list[str]:
    """Problems with ``policy.expression`` for ``sbactor config check`` (no path prefix)."""
    return compile_problems(cfg, known_models)


def check_on_error(cfg: PolicyConfig, known_models: Collection[str]) -> list[str]:
    """Problems with ``policy.on_error`` model names, each as ``on_error[i]: message``."""
    problems = []
    for index, token in enumerate(cfg.on_error):
        try:
            action = parse_token(token)
        except PolicyEvalError as exc:
            problems.append(f"on_error[{index}]: {exc}")
            continue
        if isinstance(action, RouteTo) and action.model not in known_models:
            problems.append(
                f"on_error[{index}]: route_to names an unknown model {action.model!r}"
                f"{_known(known_models)}"
            )
    return problems
