"""LLM-aware resilience: classify each failure by cause, then retry, fall back or give up.

Pure core (no I/O, no trio): ``failure`` (classification), ``backoff``, ``planner`` (the
retry/fallback state machine), ``cooldown`` (deployment health), ``compress`` (context
compress-and-retry) and ``report`` (client-facing errors, stream error chunk, attempts header).
"""

from sbactor.resilience.backoff import Delay, retry_delay
from sbactor.resilience.compress import compress_messages, estimate_tokens
from sbactor.resilience.config import ResilienceConfig, RetryPolicyConfig
from sbactor.resilience.cooldown import COOLDOWN_CLASSES, CooldownTracker
from sbactor.resilience.failure import (
    Failure,
    FailureClass,
    StreamIdleTimeout,
    classify_chunk,
    classify_exception,
    classify_response,
    parse_retry_after,
)
from sbactor.resilience.planner import (
    Attempt,
    AttemptPlanner,
    Done,
    FallbackEntry,
    FallbackTable,
    GiveUp,
    PlannerError,
    Step,
    Try,
)
from sbactor.resilience.report import (
    ClientError,
    attempts_detail,
    attempts_header,
    give_up_error,
    stream_error_chunk,
    stream_error_sse,
)
from sbactor.resilience.stream import StreamGuard, StreamStatistics

__all__ = [
    "COOLDOWN_CLASSES", "Attempt", "AttemptPlanner", "ClientError", "CooldownTracker", "Delay",
    "Done", "Failure", "FailureClass", "FallbackEntry", "FallbackTable", "GiveUp", "PlannerError",
    "ResilienceConfig", "RetryPolicyConfig", "Step", "StreamGuard", "StreamIdleTimeout",
    "StreamStatistics", "Try",
    "attempts_detail", "attempts_header", "classify_chunk", "classify_exception",
    "classify_response", "compress_messages", "estimate_tokens", "give_up_error",
    "parse_retry_after", "retry_delay", "stream_error_chunk", "stream_error_sse",
]
