"""A JSON Schema of the config, derived from the attrs classes so it can never drift from them."""

from __future__ import annotations

import types
import typing
from typing import Any, Literal, Union, get_args, get_origin

import attrs


def json_schema(root: type) -> dict[str, Any]:
    defs: dict[str, Any] = {}
    schema = _schema(root, defs)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "sbactor config",
        **schema,
        "$defs": defs,
    }


def _schema(tp: Any, defs: dict[str, Any]) -> dict[str, Any]:
    origin = get_origin(tp)
    if tp is str:
        return {"type": "string"}
    if tp is bool:
        return {"type": "boolean"}
    if tp is int:
        return {"type": "integer"}
    if tp is float:
        return {"type": "number"}
    if tp is type(None):
        return {"type": "null"}
    if tp is Any:
        return {}
    if origin is Literal:
        return {"enum": list(get_args(tp))}
    if origin in (Union, types.UnionType):
        return {"anyOf": [_schema(a, defs) for a in get_args(tp)]}
    if origin in (list, tuple):
        args = get_args(tp)
        return {"type": "array", "items": _schema(args[0], defs) if args else {}}
    if origin is dict:
        args = get_args(tp)
        return {"type": "object", "additionalProperties": _schema(args[1], defs) if args else {}}
    if attrs.has(tp):
        name = tp.__name__
        if name not in defs:
            defs[name] = {}  # placeholder breaks recursion
            hints = typing.get_type_hints(tp)
            props: dict[str, Any] = {}
            required: list[str] = []
            for field in attrs.fields(tp):
                if not field.init:
                    continue
                prop = _schema(hints[field.name], defs)
                default = field.default
                if default is attrs.NOTHING:
                    required.append(field.name)
                elif not isinstance(default, attrs.Factory) and _plain(default):  # type: ignore[arg-type]
                    prop["default"] = default
                props[field.name] = prop
            defs[name] = {
                "type": "object",
                "properties": props,
                "additionalProperties": False,
                **({"required": required} if required else {}),
            }
        return {"$ref": f"#/$defs/{name}"}
    return {}


def _plain(value: Any) -> bool:
    return value is None or isinstance(value, str | int | float | bool)
