"""Errors the gateway answers with, in OpenAI's shape ``{"error": {"message", "type", "code"}}``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs
import orjson


@attrs.frozen
class GatewayError(Exception):
    """An error answer: status, message, and OpenAI's ``type``/``code``."""

    status: int
    message: str
    type: str = "invalid_request_error"
    code: str | None = None
    headers: Mapping[str, str] = attrs.field(factory=dict)
    param: str | None = None
    details: Mapping[str, Any] = attrs.field(factory=dict)  # extra fields, e.g. a budget's scope

    def body(self) -> bytes:
        return error_body(self.message, self.type, self.code, self.param, self.details)

    def __str__(self) -> str:
        return f"{self.status} {self.type}: {self.message}"


def error_body(
    message: str,
    type_: str,
    code: str | None = None,
    param: str | None = None,
    details: Mapping[str, Any] | None = None,
) -> bytes:
    error = {"message": message, "type": type_, "code": code, "param": param, **(details or {})}
    return orjson.dumps({"error": error})


def bad_request(message: str, code: str | None = None, param: str | None = None) -> GatewayError:
    return GatewayError(400, message, "invalid_request_error", code, param=param)
