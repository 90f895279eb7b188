"""What one request carries through the pipeline, and parsing the client's body into it."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import attrs
import orjson

from sbactor.auth import Principal
from sbactor.config import ModelConfig
from sbactor.errors import GatewayError, bad_request
from sbactor.ids import new_id
from sbactor.resilience.planner import Attempt


@attrs.frozen
class Incoming:
    """An HTTP request as the pipeline sees it, whatever server framework delivered it."""

    request_id: str
    started: float  # time.perf_counter() when the request arrived
    headers: Mapping[str, str]  # lower-case names
    body: bytes


@attrs.frozen
class Reply:
    """What the pipeline answers: a whole body, or a stream of SSE bytes."""

    status: int
    headers: dict[str, str]
    body: bytes = b""
    stream: AsyncIterator[bytes] | None = None
    # called if ``stream`` is dropped before its first item: an unstarted async generator
    # runs no cleanup of its own, and the upstream, the reservation and the event need one
    abandon: Callable[[], Awaitable[None]] | None = None


@attrs.define(eq=False)
class RequestContext:
    """Mutable per-request state, owned by the request's task alone."""

    request_id: str  # what the client sees (its own x-request-id when it sent one)
    started: float
    principal: Principal
    surface: str
    body: dict[str, Any]
    requested_model: str
    model: ModelConfig
    stream: bool = False
    include_usage: bool = False
    tags: list[str] = attrs.field(factory=list)
    sink_tag: str | None = None
    headers: dict[str, str] = attrs.field(factory=dict)
    upstream_s: float = 0.0
    attempts: list[Attempt] = attrs.field(factory=list)
    provider_refused: bool = False
    guardrails: dict[str, Any] | None = None
    budget: dict[str, Any] | None = None
    policy: dict[str, Any] | None = None
    reserved: bool = False
    finalized: bool = False
    # unique per request even when clients reuse an x-request-id: the key for budget
    # reservations and for the ledger's dedup (so a retried request's real spend is recorded)
    uid: str = attrs.field(factory=new_id)

    def overhead_ms(self) -> float:
        total = time.perf_counter() - self.started
        return max(0.0, (total - self.upstream_s) * 1000.0)

    def elapsed_ms(self) -> float:
        return (time.perf_counter() - self.started) * 1000.0


def parse_body(raw: bytes) -> dict[str, Any]:
    if not raw:
        raise bad_request("request body is empty; expected a JSON object", "invalid_json")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise bad_request(f"request body is not valid JSON: {exc}", "invalid_json") from None
    if not isinstance(body, dict):
        raise bad_request("request body must be a JSON object", "invalid_json")
    return body


def require_model(
    body: dict[str, Any], models: dict[str, ModelConfig], surface: str
) -> ModelConfig:
    name = body.get("model")
    if name is None:
        raise bad_request("missing required field 'model'", "missing_field", "model")
    if not isinstance(name, str) or not name:
        raise bad_request("'model' must be a non-empty string", "invalid_type", "model")
    model = models.get(name)
    if model is None:
        known = ", ".join(sorted(m for m, cfg in models.items() if cfg.surface == surface))
        raise GatewayError(
            404,
            f"model {name!r} does not exist (available: {known or 'none'})",
            "invalid_request_error",
            "model_not_found",
            param="model",
        )
    if model.surface != surface:
        raise bad_request(
            f"model {name!r} serves {model.surface}, not {surface}", "wrong_surface", "model"
        )
    return model


def validate_chat(body: dict[str, Any]) -> None:
    messages = body.get("messages")
    if messages is None:
        raise bad_request("missing required field 'messages'", "missing_field", "messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' must be a non-empty array", "invalid_type", "messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise bad_request(
                f"messages[{i}] must be an object with a string 'role'",
                "invalid_type",
                f"messages[{i}]",
            )
    if "stream" in body and not isinstance(body["stream"], bool):
        raise bad_request("'stream' must be true or false", "invalid_type", "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad_request("'stream_options' must be an object", "invalid_type", "stream_options")
    for field in ("max_tokens", "max_completion_tokens"):
        value = body.get(field)
        if value is not None and (
            not isinstance(value, int) or isinstance(value, bool) or value < 1
        ):
            raise bad_request(f"'{field}' must be a positive integer", "invalid_type", field)


def validate_embeddings(body: dict[str, Any]) -> None:
    data = body.get("input")
    if data is None:
        raise bad_request("missing required field 'input'", "missing_field", "input")
    if not isinstance(data, str | list) or (isinstance(data, list) and not data):
        raise bad_request("'input' must be a string or a non-empty array", "invalid_type", "input")
