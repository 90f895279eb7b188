"""What a failure looks like to the client: HTTP error, stream error chunk, attempts header.

Errors use OpenAI's shape so SDKs raise the right exception. An upstream that rejected the
*gateway's* credentials is a 502, not a 401: the client's key was fine.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs
import orjson

from sbactor.resilience.failure import Failure, FailureClass
from sbactor.resilience.planner import Attempt, GiveUp

__all__ = ["ClientError", "attempts_detail", "attempts_header", "give_up_error",
           "stream_error_chunk", "stream_error_sse"]

# class -> (HTTP status, OpenAI error type, default code)
_CLIENT: dict[FailureClass, tuple[int, str, str]] = {
    FailureClass.TIMEOUT: (504, "timeout_error", "upstream_timeout"),
    FailureClass.RATE_LIMIT: (429, "rate_limit_error", "rate_limit_exceeded"),
    FailureClass.CONTEXT_WINDOW: (400, "invalid_request_error", "context_length_exceeded"),
    FailureClass.CONTENT_POLICY: (400, "invalid_request_error", "content_filter"),
    FailureClass.AUTH: (502, "upstream_error", "upstream_auth_failed"),
    FailureClass.BAD_REQUEST: (400, "invalid_request_error", "upstream_bad_request"),
    FailureClass.NOT_FOUND: (502, "upstream_error", "upstream_model_not_found"),
    FailureClass.SERVER_ERROR: (502, "upstream_error", "upstream_server_error"),
    FailureClass.CONNECTION: (502, "upstream_error", "upstream_unreachable"),
    FailureClass.UNKNOWN: (502, "upstream_error", "upstream_error"),
}


@attrs.frozen
class ClientError:
    status: int
    type: str
    code: str
    message: str
    retry_after_s: float | None = None

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "code": self.code,
                          "param": None}}


def _describe(failure: Failure) -> str:
    status = f" ({failure.status})" if failure.status else ""
    return f"{failure.cls.value}{status}: {failure.message}" if failure.message else (
        f"{failure.cls.value}{status}")


def give_up_error(give_up: GiveUp, attempts: Sequence[Attempt]) -> ClientError:
    """The error answer for a request the planner gave up on (precise, no traceback)."""
    failure = give_up.failure
    status, etype, code = _CLIENT[failure.cls]
    if failure.code == "no_deployment":
        status, code = 503, "no_deployment_available"
    if failure.cls is FailureClass.BAD_REQUEST and failure.status == 422:
        status = 422
    where = ""
    if attempts:
        last = next((a for a in reversed(attempts) if a.deployment), attempts[-1])
        where = f" from model {last.model!r}" + (f" via {last.deployment}" if last.deployment
                                                 else "")
    n = len(attempts)
    message = (f"upstream failed{where} after {n} attempt{'s' if n != 1 else ''}: "
               f"{_describe(failure)} — {give_up.reason}")
    retry_after = failure.retry_after_s if failure.cls is FailureClass.RATE_LIMIT else None
    return ClientError(status, etype, code, message, retry_after)


def stream_error_chunk(failure: Failure, *, model: str, completion_id: str,
                       created: int) -> dict[str, Any]:
    """The OpenAI-style chunk that ends a stream which failed after its first byte was sent.
    OpenAI's SDK raises ``APIError`` on it; the stream then closes without ``[DONE]``, so no client
    mistakes the partial answer for a complete one."""
    _status, etype, code = _CLIENT[failure.cls]
    return {
        "id": completion_id, "object": "chat.completion.chunk", "created": created,
        "model": model, "choices": [],
        "error": {"message": f"the upstream failed mid-stream: {_describe(failure)}",
                  "type": etype, "code": code, "param": None},
    }


def stream_error_sse(failure: Failure, *, model: str, completion_id: str, created: int) -> bytes:
    """``stream_error_chunk`` as one SSE event (the last bytes of the response)."""
    chunk = stream_error_chunk(failure, model=model, completion_id=completion_id, created=created)
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


def attempts_header(attempts: Sequence[Attempt]) -> str:
    """``x-sbactor-attempts``: the number of attempts (details via ``attempts_detail``)."""
    return str(len(attempts))


def attempts_detail(attempts: Sequence[Attempt]) -> str:
    """Compact one-line log, e.g. ``gpt-4o@openai-1:rate_limit+0.00s, gpt-4o@openai-1:ok+0.52s``."""
    parts = []
    for a in attempts:
        outcome = a.cls.value if a.cls else "ok"
        parts.append(f"{a.model}@{a.deployment or '-'}:{outcome}+{a.delay_s:.2f}s")
    return ", ".join(parts)
