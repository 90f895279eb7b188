"""The ``ai`` map a policy sees: neutral values, a typed builder, and a fast, capped CEL conversion.

Every field always exists (with a neutral value when its feature is off or not fed yet), so a
policy written today keeps working as features land. Field types are fixed by a schema, because CEL
does not compare an int with a double: ``ai.budget.fraction`` is always a double, even when the
gateway computed ``0``.

Conversion to CEL types runs on every request, so it is hand-rolled (celpy's ``json_to_cel`` costs
~90 us for this map) and bounded: oversize input raises ``ActivationError`` instead of feeding an
arbitrarily large structure into the evaluator.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from celpy import celtypes

#: Longest string anywhere in the activation.
MAX_STRING_CHARS = 4096
#: Most items in any list (verdicts, labels, tags).
MAX_LIST_ITEMS = 256
#: Most keys in any map.
MAX_MAP_KEYS = 64
#: Deepest nesting below ``ai`` (``ai.guardrails.verdicts[0].x`` is depth 4).
MAX_DEPTH = 6
#: Most values in the whole activation.
MAX_NODES = 4096

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1

# The schema: section -> field -> kind ("str", "int", "float", "bool", "str_list", "any_list").
SCHEMA: dict[str, dict[str, str]] = {
    "route": {"model": "str", "provider": "str"},
    "principal": {
        "key_id": "str",
        "user": "str",
        "team": "str",
        "tier": "str",
        "tags": "str_list",
    },
    "guardrails": {
        "flagged": "bool",
        "flagged_count": "int",
        "labels": "str_list",
        "verdicts": "any_list",
    },
    "budget": {"fraction": "float", "exceeded": "bool", "forecast_fraction": "float"},
    "tokens": {"input_est": "int", "max_output": "int"},
    "request": {"stream": "bool", "tools": "bool"},
}
SCALARS: dict[str, str] = {"surface": "str", "model": "str"}

_NEUTRAL: dict[str, Any] = {
    "surface": "chat",
    "model": "",
    "route": {"model": "", "provider": ""},
    "principal": {"key_id": "", "user": "", "team": "", "tier": "", "tags": []},
    "guardrails": {"flagged": False, "flagged_count": 0, "labels": [], "verdicts": []},
    "budget": {"fraction": 0.0, "exceeded": False, "forecast_fraction": 0.0},
    "tokens": {"input_est": 0, "max_output": 0},
    "request": {"stream": False, "tools": False},
}


class ActivationError(ValueError):
    """An activation of the wrong shape, type or size."""


def neutral_activation() -> dict[str, Any]:
    """The full ``{"ai": {...}}`` activation with every field at its neutral value."""
    return {"ai": copy.deepcopy(_NEUTRAL)}


def _coerce(kind: str, value: Any, path: str) -> Any:
    if kind == "str":
        if not isinstance(value, str):
            raise ActivationError(f"{path}: expected a string, got {type(value).__name__}")
        return value
    if kind == "bool":
        if not isinstance(value, bool):
            raise ActivationError(f"{path}: expected true or false, got {type(value).__name__}")
        return value
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ActivationError(f"{path}: expected an integer, got {type(value).__name__}")
        return value
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ActivationError(f"{path}: expected a number, got {type(value).__name__}")
        return float(value)
    if not isinstance(value, list | tuple):
        raise ActivationError(f"{path}: expected a list, got {type(value).__name__}")
    if kind == "str_list":
        for i, item in enumerate(value):
            if not isinstance(item, str):
                raise ActivationError(f"{path}[{i}]: expected a string")
    return list(value)


def build_activation(
    *,
    surface: str = "chat",
    model: str = "",
    route: Mapping[str, Any] | None = None,
    principal: Mapping[str, Any] | None = None,
    guardrails: Mapping[str, Any] | None = None,
    budget: Mapping[str, Any] | None = None,
    tokens: Mapping[str, Any] | None = None,
    request: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """``{"ai": {...}}`` from the pieces a request has; missing fields get neutral values.

    Unknown keys and wrong types raise ``ActivationError`` (a typo in the gateway's wiring should
    fail loudly in tests, not feed ``ai.*`` a value no policy can see).
    """
    ai: dict[str, Any] = {
        "surface": _coerce("str", surface, "ai.surface"),
        "model": _coerce("str", model, "ai.model"),
    }
    given = {
        "route": route,
        "principal": principal,
        "guardrails": guardrails,
        "budget": budget,
        "tokens": tokens,
        "request": request,
    }
    for section, fields in SCHEMA.items():
        piece = given[section] or {}
        unknown = sorted(set(piece) - set(fields))
        if unknown:
            raise ActivationError(
                f"ai.{section}: unknown field {unknown[0]!r} (known: {', '.join(fields)})"
            )
        out: dict[str, Any] = {}
        for name, kind in fields.items():
            if name in piece and piece[name] is not None:
                out[name] = _coerce(kind, piece[name], f"ai.{section}.{name}")
            else:
                out[name] = copy.copy(_NEUTRAL[section][name])
        ai[section] = out
    return {"ai": ai}


def activation_from_json(document: Any) -> dict[str, Any]:
    """A sample file (``{"ai": {...}}`` or the bare ``ai`` map, may be partial) to an activation."""
    if isinstance(document, dict) and set(document) == {"ai"}:
        document = document["ai"]
    if not isinstance(document, dict):
        raise ActivationError("expected a JSON object with the ai.* fields (or {\"ai\": {...}})")
    known = set(SCALARS) | set(SCHEMA)
    unknown = sorted(set(document) - known)
    if unknown:
        names = ", ".join(sorted(known))
        raise ActivationError(f"ai: unknown field {unknown[0]!r} (known: {names})")
    for section in SCHEMA:
        if section in document and not isinstance(document[section], dict):
            raise ActivationError(f"ai.{section}: expected an object")
    return build_activation(**document)


# --- conversion to CEL values ------------------------------------------------------------------

_KEYS: dict[str, celtypes.StringType] = {}
_TRUE = celtypes.BoolType(True)
_FALSE = celtypes.BoolType(False)
_new_str = str.__new__
_new_int = int.__new__
_new_float = float.__new__


def _key(name: str) -> celtypes.StringType:
    key = _KEYS.get(name)
    if key is None:
        key = _new_str(celtypes.StringType, name)
        if len(_KEYS) < 1024:
            _KEYS[name] = key
    return key


class _Budget:
    __slots__ = ("nodes",)

    def __init__(self) -> None:
        self.nodes = 0


_STRING, _INT, _DOUBLE = celtypes.StringType, celtypes.IntType, celtypes.DoubleType


def _cel(value: Any, depth: int, budget: _Budget) -> Any:
    tp = type(value)
    if tp is str:
        if len(value) > MAX_STRING_CHARS:
            raise ActivationError(f"a string is longer than {MAX_STRING_CHARS} characters")
        return _new_str(_STRING, value)
    if tp is bool:
        return _TRUE if value else _FALSE
    if tp is int:
        if not _INT64_MIN <= value <= _INT64_MAX:
            raise ActivationError("an integer is out of the int64 range")
        return _new_int(_INT, value)
    if tp is float:
        return _new_float(_DOUBLE, value)
    if value is None:
        return None
    if depth >= MAX_DEPTH:
        raise ActivationError(f"activation is nested deeper than {MAX_DEPTH} levels")
    if tp is dict:
        if len(value) > MAX_MAP_KEYS:
            raise ActivationError(f"a map has more than {MAX_MAP_KEYS} keys")
        budget.nodes += len(value)
        if budget.nodes > MAX_NODES:
            raise ActivationError(f"activation has more than {MAX_NODES} values")
        out = celtypes.MapType()
        depth += 1
        for k, v in value.items():
            if type(k) is not str:
                raise ActivationError("map keys must be strings")
            key = _KEYS.get(k)
            dict.__setitem__(out, key if key is not None else _key(k), _cel(v, depth, budget))
        return out
    if tp is list or tp is tuple:
        if len(value) > MAX_LIST_ITEMS:
            raise ActivationError(f"a list has more than {MAX_LIST_ITEMS} items")
        budget.nodes += len(value)
        if budget.nodes > MAX_NODES:
            raise ActivationError(f"activation has more than {MAX_NODES} values")
        depth += 1
        return celtypes.ListType([_cel(v, depth, budget) for v in value])
    # Subclasses (str enums, IntEnum...) take the slow, checked path.
    for base in (bool, int, float, str):
        if isinstance(value, base):
            return _cel(base(value), depth, budget)
    raise ActivationError(f"unsupported value of type {tp.__name__}")


def to_cel(activation: Mapping[str, Any]) -> dict[str, Any]:
    """Plain Python activation to CEL values, enforcing the size caps."""
    budget = _Budget()
    return {name: _cel(value, 0, budget) for name, value in activation.items()}
