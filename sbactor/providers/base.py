"""The provider interface the request pipeline consumes.

Non-2xx upstream answers are *returned* (``UpstreamResponse`` / ``UpstreamStream.error``) so the
pipeline can classify them; only transport failures raise (``UpstreamError`` subclasses).
Every provider speaks OpenAI chat-completions shape to the pipeline, whatever its upstream speaks.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol, runtime_checkable

import attrs
import orjson

from sbactor.providers.config import (
    AnthropicProviderConfig,
    MockProviderConfig,
    OpenAIProviderConfig,
    ProviderConfig,
)


class UpstreamError(Exception):
    """A transport-level failure talking to an upstream (no HTTP answer to classify)."""


class UpstreamTimeout(UpstreamError):
    """The upstream did not connect / answer / send the next bytes in time."""


class UpstreamConnectionError(UpstreamError):
    """Could not connect, or the connection failed before a response arrived."""


class UpstreamStreamBroken(UpstreamError):
    """A stream ended or broke before its end marker (``[DONE]`` / ``message_stop``)."""


class UpstreamStreamTimeout(UpstreamStreamBroken, UpstreamTimeout):
    """A stream stalled longer than the read timeout (both broken and a timeout)."""


@attrs.frozen
class UpstreamResponse:
    """A complete upstream answer. ``json`` is the parsed body when it is JSON."""

    status: int
    headers: Mapping[str, str]
    body: bytes
    json: Mapping[str, Any] | None
    latency_s: float

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


def parse_json(body: bytes) -> Mapping[str, Any] | None:
    """Parse a JSON object body; anything else (HTML error page, empty, list) → None."""
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def make_response(status: int, headers: Mapping[str, str], json: Mapping[str, Any] | None,
                  latency_s: float, body: bytes | None = None) -> UpstreamResponse:
    """Build a response from a JSON value (body serialized) — used by translators and the mock."""
    raw = body if body is not None else (orjson.dumps(json) if json is not None else b"")
    hdrs = {k.lower(): v for k, v in headers.items()}
    if json is not None:
        hdrs.setdefault("content-type", "application/json")
    return UpstreamResponse(status=status, headers=hdrs, body=raw, json=json, latency_s=latency_s)


class UpstreamStream:
    """An open streamed answer. Check ``error`` first: set when the upstream answered non-2xx
    (then ``chunks()`` yields nothing). Otherwise iterate ``chunks()`` for OpenAI chunk dicts."""

    status: int
    headers: Mapping[str, str]
    error: UpstreamResponse | None

    def __init__(self, status: int, headers: Mapping[str, str],
                 error: UpstreamResponse | None = None) -> None:
        self.status = status
        self.headers = {k.lower(): v for k, v in headers.items()}
        self.error = error

    def chunks(self) -> AsyncIterator[dict[str, Any]]:
        """Parsed ``chat.completion.chunk`` dicts; raises ``UpstreamStreamBroken`` on a cut."""
        raise NotImplementedError

    async def chunk_batches(self) -> AsyncIterator[list[dict[str, Any]]]:
        """The same chunks, grouped by what arrived together, so the relay can forward a group
        with one write. Providers that read from a network override this."""
        async for chunk in self.chunks():
            yield [chunk]


@attrs.frozen
class ProviderStatistics:
    name: str
    type: str
    requests: int
    in_flight: int
    transport_errors: int
    error_responses: int


@runtime_checkable
class Provider(Protocol):
    """What the pipeline calls. ``body`` is an OpenAI request dict, ``model`` already set."""

    name: str

    async def chat(self, body: dict[str, Any]) -> UpstreamResponse: ...

    def open_chat_stream(
        self, body: dict[str, Any]
    ) -> AbstractAsyncContextManager[UpstreamStream]: ...

    async def embeddings(self, body: dict[str, Any]) -> UpstreamResponse: ...

    async def aclose(self) -> None: ...

    def statistics(self) -> ProviderStatistics: ...


def build_provider(cfg: ProviderConfig) -> Provider:
    """One provider (with its own shared HTTP client) per configured provider."""
    if isinstance(cfg, OpenAIProviderConfig):
        from sbactor.providers.openai import OpenAIProvider

        return OpenAIProvider(cfg)
    if isinstance(cfg, AnthropicProviderConfig):
        from sbactor.providers.anthropic import AnthropicProvider

        return AnthropicProvider(cfg)
    if isinstance(cfg, MockProviderConfig):
        from sbactor.providers.mock import MockProvider

        return MockProvider(cfg)
    raise TypeError(f"unknown provider config {type(cfg).__name__}")
