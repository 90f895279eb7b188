"""Turning YAML into typed config: env substitution, cattrs structuring, errors with paths.

Every problem is reported with its YAML path and all problems at once, because a gateway config
is edited by hand and a user who fixes one typo per restart loses an afternoon.
"""

from __future__ import annotations

import os
import re
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, Literal, Union, get_args, get_origin

import attrs
import cattrs
import yaml
from cattrs.errors import ClassValidationError, ForbiddenExtraKeysError, IterableValidationError


class ConfigError(Exception):
    """A config that cannot be used; ``problems`` lists each one as ``path: message``."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


_ENV = re.compile(
    r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}"  # ${NAME} or ${NAME:-default}
)


def substitute_env(node: Any, env: Mapping[str, str], path: str, problems: list[str]) -> Any:
    """Replace ``${VAR}`` / ``${VAR:-default}`` in every string.

    An unset VAR without a default is an error: an empty admin key must never happen silently.
    """
    if isinstance(node, str):

        def repl(m: re.Match[str]) -> str:
            name, default = m.group(1), m.group(2)
            if name in env:
                return env[name]
            if default is not None:
                return default
            problems.append(f"{path or '<root>'}: environment variable {name} is not set")
            return ""

        return _ENV.sub(repl, node)
    if isinstance(node, dict):
        return {k: substitute_env(v, env, _join(path, str(k)), problems) for k, v in node.items()}
    if isinstance(node, list):
        return [substitute_env(v, env, f"{path}[{i}]", problems) for i, v in enumerate(node)]
    return node


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _type_name(tp: Any) -> str:
    if tp in (str, int, float, bool):
        return {str: "a string", int: "an integer", float: "a number", bool: "true or false"}[tp]
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if get_origin(tp) in (list, tuple):
        return "a list"
    if get_origin(tp) is dict:
        return "a mapping"
    if attrs.has(tp):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _is_union(tp: Any) -> bool:
    return get_origin(tp) in (Union, types.UnionType)


def make_converter() -> cattrs.Converter:
    conv = cattrs.Converter(forbid_extra_keys=True, detailed_validation=True)

    def structure_strict(tp: type) -> Callable[[Any, type], Any]:
        def hook(value: Any, _: type) -> Any:
            if tp is float and isinstance(value, int) and not isinstance(value, bool):
                return float(value)
            if tp is str and isinstance(value, int | float) and not isinstance(value, bool):
                return str(value)
            if not isinstance(value, tp) or (tp is not bool and isinstance(value, bool)):
                raise ValueError(f"expected {_type_name(tp)}, got {_describe(value)}")
            return value

        return hook

    for tp in (str, int, float, bool):
        conv.register_structure_hook(tp, structure_strict(tp))

    def is_tagged_union(tp: Any) -> bool:
        if not _is_union(tp):
            return False
        members = [a for a in get_args(tp) if a is not type(None)]
        return len(members) > 1 and all(attrs.has(m) and _tag_values(m) for m in members)

    def structure_tagged(value: Any, tp: Any) -> Any:
        members = [a for a in get_args(tp) if a is not type(None)]
        if value is None and type(None) in get_args(tp):
            return None
        if not isinstance(value, dict):
            raise ValueError(f"expected a mapping with a 'type' field, got {_describe(value)}")
        by_tag = {tag: m for m in members for tag in _tag_values(m)}
        tag = value.get("type")
        if tag not in by_tag:
            known = ", ".join(sorted(by_tag))
            raise ValueError(f"type: unknown type {tag!r} (known: {known})")
        return conv.structure(value, by_tag[tag])

    conv.register_structure_hook_func(is_tagged_union, structure_tagged)

    def structure_str_list(value: Any, _: Any) -> list[str]:
        if isinstance(value, str):
            return [value]  # `fallbacks: gpt-4o` means a list of one
        if not isinstance(value, list):
            raise ValueError(f"expected a list of strings, got {_describe(value)}")
        return [conv.structure(v, str) for v in value]

    conv.register_structure_hook_func(lambda tp: tp == list[str], structure_str_list)

    def structure_literal(value: Any, tp: Any) -> Any:
        if value not in get_args(tp):
            raise ValueError(f"expected {_type_name(tp)}, got {_describe(value)}")
        return value

    conv.register_structure_hook_func(lambda tp: get_origin(tp) is Literal, structure_literal)

    def is_plain_list(tp: Any) -> bool:
        return get_origin(tp) is list and tp != list[str]

    def list_hook(tp: Any) -> Callable[[Any, Any], list[Any]]:
        base: Callable[[Any, Any], list[Any]] = cattrs.cols.list_structure_factory(tp, conv)

        def hook(value: Any, _: Any) -> list[Any]:
            if not isinstance(value, list):
                raise ValueError(f"expected a list, got {_describe(value)}")
            return base(value, tp)

        return hook

    conv.register_structure_hook_factory(is_plain_list, list_hook)

    def attrs_hook(cl: type) -> Callable[[Any, type], Any]:
        base: Callable[[Any, type], Any] = cattrs.gen.make_dict_structure_fn(
            cl, conv, _cattrs_forbid_extra_keys=True, _cattrs_detailed_validation=True
        )

        def hook(value: Any, _: type) -> Any:
            if not isinstance(value, dict):
                raise ValueError(f"expected a mapping, got {_describe(value)}")
            try:
                return base(value, cl)
            except ClassValidationError as exc:
                subs = exc.exceptions
                if all(isinstance(s, ForbiddenExtraKeysError) for s in subs):
                    # cattrs stops before __init__: check the known keys too, to report all.
                    known = {a.alias for a in attrs.fields(cl)}
                    try:
                        hook({k: v for k, v in value.items() if k in known}, cl)
                    except (ClassValidationError, FieldErrors) as inner:
                        more = (
                            inner.exceptions if isinstance(inner, ClassValidationError) else [inner]
                        )
                        raise ClassValidationError(exc.message, [*more, *subs], cl) from None
                    raise
                # A lone, unlabelled ValueError is an attrs validator raising in __init__:
                # find which fields failed, so each problem's path names its field.
                if len(subs) != 1 or _note_of(subs[0]) is not None:
                    raise
                if not isinstance(subs[0], ValueError | TypeError):
                    raise
                fields = _failing_fields(cl, lambda: base(value, cl))
                if not fields:
                    raise
                raise FieldErrors(fields) from exc

        return hook

    conv.register_structure_hook_factory(attrs.has, attrs_hook)
    return conv


class FieldErrors(ValueError):
    """Validator failures of one attrs class, each with the field it belongs to."""

    def __init__(self, errors: list[tuple[str, str]]) -> None:
        self.errors = errors
        super().__init__("; ".join(f"{name}: {msg}" for name, msg in errors))


def _failing_fields(cl: type, build: Callable[[], Any]) -> list[tuple[str, str]]:
    try:
        with attrs.validators.disabled():
            instance = build()
    except Exception:
        return []
    errors = []
    for field in attrs.fields(cl):
        if field.validator is None:
            continue
        try:
            field.validator(instance, field, getattr(instance, field.name))
        except (ValueError, TypeError) as exc:
            message = str(exc)
            if message.startswith(f"{field.name}: "):
                errors.append(("", message))  # already names its field: `path: field: ...`
            else:
                errors.append((field.name, message.removeprefix(f"{field.name} ")))
    return errors


def _tag_values(cls: type) -> tuple[str, ...]:
    field = attrs.fields_dict(cls).get("type")
    if field is None:
        return ()
    hints = typing.get_type_hints(cls)
    tp = hints.get("type")
    if get_origin(tp) is Literal:
        return tuple(str(a) for a in get_args(tp))
    return ()


def _describe(value: Any) -> str:
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return f"{str(value).lower()}"
    if isinstance(value, str):
        return f"{value!r}"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return repr(value)


def structure(data: Any, cls: type, converter: cattrs.Converter) -> Any:
    """Structure ``data`` into ``cls`` or raise ConfigError listing every problem with its path."""
    try:
        return converter.structure(data, cls)
    except (ClassValidationError, IterableValidationError) as exc:
        raise ConfigError(_flatten(exc, "")) from None
    except (ValueError, TypeError) as exc:
        raise ConfigError([f"<root>: {exc}"]) from None


def _flatten(exc: BaseException, path: str) -> list[str]:
    problems: list[str] = []
    if isinstance(exc, ForbiddenExtraKeysError):
        known = ", ".join(sorted(a.name for a in attrs.fields(exc.cl)))
        for key in sorted(exc.extra_fields):
            problems.append(f"{_join(path, key)}: unknown key (allowed: {known})")
        return problems
    if isinstance(exc, ClassValidationError | IterableValidationError):
        for sub in exc.exceptions:
            note = _note_of(sub)
            problems.extend(_flatten(sub, _join_note(path, note)))
        return problems
    if isinstance(exc, FieldErrors):
        return [
            f"{_join(path, name) if name else path or '<root>'}: {message}"
            for name, message in exc.errors
        ]
    if isinstance(exc, KeyError):
        return [f"{path}: required key missing"]
    message = str(exc) or type(exc).__name__
    if isinstance(exc, TypeError) and "required positional argument" in message:
        return [f"{path}: required key missing"]
    return [f"{path or '<root>'}: {message}"]


def _note_of(exc: BaseException) -> Any:
    for note in getattr(exc, "__notes__", []) or []:
        name = getattr(note, "name", None)
        if name is not None:
            return ("attr", name)
        index = getattr(note, "index", None)
        if index is not None:
            return ("index", index)
    return None


def _join_note(path: str, note: Any) -> str:
    if note is None:
        return path
    kind, value = note
    if kind == "attr":
        return _join(path, value)
    if isinstance(value, int):
        return f"{path}[{value}]"
    return _join(path, str(value))


def load_yaml_text(text: str, source: str) -> Any:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([f"{source}: invalid YAML{where}: {problem}"]) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([f"{source}: the config must be a mapping at the top level"])
    return data


def env_substituted(data: Any, env: Mapping[str, str] | None = None) -> Any:
    problems: list[str] = []
    out = substitute_env(data, os.environ if env is None else env, "", problems)
    if problems:
        raise ConfigError(problems)
    return out
