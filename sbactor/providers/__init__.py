"""Upstream providers (OpenAI-compatible, Anthropic, in-process mock) behind one interface."""

from sbactor.providers.base import (
    Provider,
    ProviderStatistics,
    UpstreamConnectionError,
    UpstreamError,
    UpstreamResponse,
    UpstreamStream,
    UpstreamStreamBroken,
    UpstreamStreamTimeout,
    UpstreamTimeout,
    build_provider,
)
from sbactor.providers.config import (
    AnthropicProviderConfig,
    MockProviderConfig,
    OpenAIProviderConfig,
    ProviderConfig,
)

__all__ = [
    "AnthropicProviderConfig",
    "MockProviderConfig",
    "OpenAIProviderConfig",
    "Provider",
    "ProviderConfig",
    "ProviderStatistics",
    "UpstreamConnectionError",
    "UpstreamError",
    "UpstreamResponse",
    "UpstreamStream",
    "UpstreamStreamBroken",
    "UpstreamStreamTimeout",
    "UpstreamTimeout",
    "build_provider",
]
