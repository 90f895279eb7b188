"""Failure classification: an upstream answer or exception → one cause.

The cause decides the treatment (retry count, which fallback list, cooldown), so it is computed
once, here, from everything the upstream told us: status, headers and body. Pure and sync.

Precedence: a specific signal in the body (``context_length_exceeded``, "prompt is too long",
``content_filter``, ``insufficient_quota``, Anthropic's ``error.type``) wins over the bare status,
because providers disagree on statuses (Anthropic's 529, Azure's 400 content filter, 413 for an
oversized prompt) but agree on their own codes.
"""

from __future__ import annotations

import email.utils
import enum
import re
import time
from collections.abc import Mapping
from typing import Any

import attrs
import httpx2
import orjson

__all__ = [
    "Failure",
    "FailureClass",
    "StreamIdleTimeout",
    "classify_chunk",
    "classify_exception",
    "classify_response",
    "parse_retry_after",
]

_MAX_MESSAGE = 500


class FailureClass(enum.StrEnum):
    TIMEOUT = "timeout"
    RATE_LIMIT = "rate_limit"
    CONTEXT_WINDOW = "context_window"
    CONTENT_POLICY = "content_policy"
    AUTH = "auth"
    BAD_REQUEST = "bad_request"
    NOT_FOUND = "not_found"
    SERVER_ERROR = "server_error"
    CONNECTION = "connection"
    UNKNOWN = "unknown"

    def __str__(self) -> str:
        return self.value


@attrs.frozen
class Failure:
    """One classified failure: the cause plus what the upstream said about it."""

    cls: FailureClass
    status: int | None = None
    message: str = ""
    code: str | None = None
    retry_after_s: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"class": self.cls.value, "status": self.status, "message": self.message,
                "code": self.code, "retry_after_s": self.retry_after_s}


class StreamIdleTimeout(Exception):
    """No stream chunk arrived within ``stream_idle_timeout_s`` (classified as a timeout)."""


# -- body signals ---------------------------------------------------------------------------------

_CONTEXT_CODES = {"context_length_exceeded", "string_above_max_length", "request_too_large",
                  "context_window_exceeded", "model_max_prompt_tokens_exceeded"}
_CONTEXT_TEXT = re.compile(
    r"maximum context length|context[_ ]length|context window|prompt is too long|"
    r"too many tokens|input is too long|reduce the length of the messages|"
    r"exceeds? the (?:model'?s? )?(?:maximum )?(?:context|token limit)|input length .* exceeds",
    re.IGNORECASE,
)
_POLICY_CODES = {"content_filter", "content_policy_violation", "responsibleaipolicyviolation",
                 "invalid_prompt", "moderation_blocked", "safety"}
_POLICY_TEXT = re.compile(
    r"content management policy|content[_ ]filter|content policy|safety system|"
    r"responsibleaipolicyviolation|flagged (?:as|by|for)|violat\w+ (?:our|the) usage polic",
    re.IGNORECASE,
)
_AUTH_CODES = {"invalid_api_key", "insufficient_quota", "invalid_authentication",
               "permission_denied", "account_deactivated", "billing_hard_limit_reached",
               "unauthorized", "authentication_error", "permission_error", "billing_error",
               "invalid_organization", "unsupported_country_region_territory"}
_RATE_CODES = {"rate_limit_exceeded", "rate_limit_error", "tokens_exceeded", "requests",
               "tokens", "too_many_requests", "resource_exhausted"}
_NOT_FOUND_CODES = {"model_not_found", "not_found_error", "deployment_not_found", "not_found",
                    "deploymentnotfound"}
_SERVER_CODES = {"overloaded_error", "overloaded", "api_error", "server_error",
                 "service_unavailable", "internal_error", "unavailable", "internal"}
_TIMEOUT_CODES = {"timeout", "timeout_error", "deadline_exceeded", "request_timeout"}
_BAD_CODES = {"invalid_request_error", "invalid_argument", "failed_precondition",
              "unsupported_value", "invalid_value"}
_TEXT_RULES: tuple[tuple[re.Pattern[str], FailureClass], ...] = (
    (re.compile(r"rate.?limit|too many requests|quota exceeded", re.I), FailureClass.RATE_LIMIT),
    (re.compile(r"timed? ?out|deadline exceeded", re.I), FailureClass.TIMEOUT),
    (re.compile(r"overloaded|service unavailable|bad gateway|internal server error", re.I),
     FailureClass.SERVER_ERROR),
    (re.compile(r"invalid api key|incorrect api key|unauthori[sz]ed|authentication", re.I),
     FailureClass.AUTH),
)


def _status_class(status: int) -> FailureClass:
    if status in (408, 504, 524):
        return FailureClass.TIMEOUT
    if status == 429:
        return FailureClass.RATE_LIMIT
    if status in (401, 403):
        return FailureClass.AUTH
    if status == 404:
        return FailureClass.NOT_FOUND
    if status == 413:
        return FailureClass.CONTEXT_WINDOW
    if 400 <= status < 500:
        return FailureClass.BAD_REQUEST
    if status >= 500:
        return FailureClass.SERVER_ERROR
    return FailureClass.UNKNOWN


def _decode(body: bytes | str | Mapping[str, Any] | None) -> tuple[Mapping[str, Any] | None, str]:
    """The body as (JSON object or None, text)."""
    if body is None:
        return None, ""
    if isinstance(body, Mapping):
        return body, ""
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    stripped = text.strip()
    if stripped.startswith("{"):
        try:
            data = orjson.loads(stripped)
        except orjson.JSONDecodeError:
            return None, text
        if isinstance(data, dict):
            return data, text
    return None, text


def _error_object(data: Mapping[str, Any]) -> Mapping[str, Any] | None:
    err = data.get("error")
    if isinstance(err, Mapping):
        return err
    if isinstance(err, str):  # {"error": "message"} (some proxies)
        return {"message": err}
    if isinstance(err, list) and err and isinstance(err[0], Mapping):
        return err[0].get("error", err[0])  # Google's batched shape
    if data.get("type") == "error":
        return {}
    return None


def _lower(value: Any) -> str | None:
    return value.lower() if isinstance(value, str) and value else None


def _body_class(err: Mapping[str, Any], message: str) -> tuple[FailureClass | None, str | None]:
    """The cause named by an error object, strongest signal first, plus the code to report."""
    code = _lower(err.get("code"))
    etype = _lower(err.get("type"))
    gstatus = _lower(err.get("status"))  # Google: RESOURCE_EXHAUSTED, ...
    inner = err.get("innererror")
    inner_code = _lower(inner.get("code")) if isinstance(inner, Mapping) else None
    names = [n for n in (code, inner_code, etype, gstatus) if n]
    reported = code or inner_code or etype or gstatus
    if any(n in _CONTEXT_CODES for n in names) or _CONTEXT_TEXT.search(message):
        return FailureClass.CONTEXT_WINDOW, reported
    if any(n in _POLICY_CODES for n in names) or _POLICY_TEXT.search(message):
        return FailureClass.CONTENT_POLICY, reported
    for table, cls in ((_AUTH_CODES, FailureClass.AUTH), (_RATE_CODES, FailureClass.RATE_LIMIT),
                       (_NOT_FOUND_CODES, FailureClass.NOT_FOUND),
                       (_TIMEOUT_CODES, FailureClass.TIMEOUT),
                       (_SERVER_CODES, FailureClass.SERVER_ERROR)):
        if any(n in table for n in names):
            return cls, reported
    if gstatus in ("unauthenticated",):
        return FailureClass.AUTH, reported
    if any(n in _BAD_CODES for n in names):
        return FailureClass.BAD_REQUEST, reported
    return None, reported


def _text_class(text: str) -> FailureClass | None:
    if _CONTEXT_TEXT.search(text):
        return FailureClass.CONTEXT_WINDOW
    if _POLICY_TEXT.search(text):
        return FailureClass.CONTENT_POLICY
    for pattern, cls in _TEXT_RULES:
        if pattern.search(text):
            return cls
    return None


def _success_refusal(data: Mapping[str, Any]) -> Failure | None:
    """A 2xx answer that is really a refusal (``refusal``, ``content_filter``, Anthropic's)."""
    if data.get("stop_reason") == "refusal":
        return Failure(FailureClass.CONTENT_POLICY, 200, "the model refused (stop_reason=refusal)",
                       "refusal")
    choices = data.get("choices")
    if not isinstance(choices, list):
        return None
    for choice in choices:
        if not isinstance(choice, Mapping):
            continue
        if choice.get("finish_reason") == "content_filter":
            return Failure(FailureClass.CONTENT_POLICY, 200,
                           "the answer was withheld by the provider's content filter",
                           "content_filter")
        message = choice.get("message") or choice.get("delta")
        if isinstance(message, Mapping):
            refusal = message.get("refusal")
            if isinstance(refusal, str) and refusal.strip():
                return Failure(FailureClass.CONTENT_POLICY, 200,
                               f"the model refused: {refusal[:_MAX_MESSAGE]}", "refusal")
    return None


# -- retry-after ----------------------------------------------------------------------------------

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")


def _duration_s(value: str) -> float | None:
    """OpenAI's ``x-ratelimit-reset-*``: ``1s``, ``6m0s``, ``20ms``, ``1m30.5s``."""
    value = value.strip()
    parts = _DURATION.findall(value)
    if not parts or "".join(n + u for n, u in parts) != value:
        try:
            return max(0.0, float(value))
        except ValueError:
            return None
    scale = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    return sum(float(n) * scale[u] for n, u in parts)


def _date_delta(value: str, wall_now: float) -> float | None:
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    return max(0.0, when.timestamp() - wall_now)


def parse_retry_after(headers: Mapping[str, str], *, wall_now: float | None = None) -> float | None:
    """Seconds the upstream asked us to wait: ``retry-after-ms``, ``retry-after`` (seconds or an
    HTTP date), else the reset of an exhausted ``x-ratelimit-*`` limit. None when not stated."""
    h = {k.lower(): v for k, v in headers.items()}
    ms = h.get("retry-after-ms")
    if ms is not None:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    ra = h.get("retry-after")
    if ra is not None:
        try:
            return max(0.0, float(ra))
        except ValueError:
            delta = _date_delta(ra, time.time() if wall_now is None else wall_now)
            if delta is not None:
                return delta
    resets: list[tuple[bool, float]] = []
    for kind in ("requests", "tokens"):
        raw = h.get(f"x-ratelimit-reset-{kind}")
        seconds = _duration_s(raw) if raw else None
        if seconds is not None:
            exhausted = h.get(f"x-ratelimit-remaining-{kind}", "").strip() == "0"
            resets.append((exhausted, seconds))
    if not resets:
        return None
    spent = [s for e, s in resets if e]
    return max(spent) if spent else min(s for _, s in resets)


# -- public classifiers ---------------------------------------------------------------------------

def _clip(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _MAX_MESSAGE else text[: _MAX_MESSAGE - 1] + "…"


def classify_response(
    status: int,
    headers: Mapping[str, str],
    body: bytes | str | Mapping[str, Any] | None,
    *,
    wall_now: float | None = None,
) -> Failure | None:
    """Classify one upstream HTTP answer; None means a usable success."""
    data, text = _decode(body)
    err = _error_object(data) if data is not None else None
    if 200 <= status < 300 and err is None:
        return _success_refusal(data) if data is not None else None
    retry_after = parse_retry_after(headers, wall_now=wall_now)
    body_cls: FailureClass | None = None
    code: str | None = None
    if err is not None:
        raw_message = err.get("message")
        message = raw_message if isinstance(raw_message, str) else ""
        body_cls, code = _body_class(err, message)
        if not message:
            message = text or f"upstream answered {status}"
    else:
        message = text or f"upstream answered {status}"
        body_cls = _text_class(text) if text else None
    status_cls = _status_class(status) if status >= 300 else FailureClass.UNKNOWN
    cls = _combine(status_cls, body_cls, status)
    if cls is FailureClass.RATE_LIMIT and code == "insufficient_quota":
        cls = FailureClass.AUTH
    return Failure(cls, status, _clip(message), code,
                   retry_after if cls in (FailureClass.RATE_LIMIT, FailureClass.SERVER_ERROR,
                                          FailureClass.TIMEOUT) else None)


def _combine(status_cls: FailureClass, body_cls: FailureClass | None, status: int) -> FailureClass:
    if body_cls is None:
        return status_cls
    if body_cls in (FailureClass.CONTEXT_WINDOW, FailureClass.CONTENT_POLICY, FailureClass.AUTH):
        return body_cls  # specific signals win over any status
    if status_cls in (FailureClass.UNKNOWN, FailureClass.BAD_REQUEST, FailureClass.SERVER_ERROR):
        # a 400 named rate-limit, a 500 named overloaded/timeout: the body is more precise;
        # but an invalid_request_error type on a 5xx stays a server error.
        if body_cls is FailureClass.BAD_REQUEST and status >= 500:
            return status_cls
        return body_cls
    return status_cls


def classify_chunk(chunk: Mapping[str, Any]) -> Failure | None:
    """Classify one decoded stream chunk/event: an in-band error or a content-filter stop."""
    err = _error_object(chunk)
    if err is not None:
        status = err.get("code") if isinstance(err.get("code"), int) else None
        failure = classify_response(status or 500, {}, chunk)
        if failure is not None and status is None:
            failure = attrs.evolve(failure, status=None)
        return failure
    delta = chunk.get("delta")
    if chunk.get("type") == "message_delta" and isinstance(delta, Mapping) and (
        delta.get("stop_reason") == "refusal"
    ):
        return Failure(FailureClass.CONTENT_POLICY, None, "the model refused (stop_reason=refusal)",
                       "refusal")
    failure = _success_refusal(chunk)
    return attrs.evolve(failure, status=None) if failure is not None else None


def _exception_class(exc: BaseException) -> FailureClass | None:
    if isinstance(exc, StreamIdleTimeout | TimeoutError | httpx2.TimeoutException):
        return FailureClass.TIMEOUT
    if isinstance(exc, httpx2.TransportError | ConnectionError):
        return FailureClass.CONNECTION
    names = [t.__name__ for t in type(exc).__mro__]  # other clients, trio.TooSlowError, ...
    if any("Timeout" in n or "TooSlow" in n for n in names):
        return FailureClass.TIMEOUT
    if any(k in n for n in names for k in _CONNECTION_NAMES):
        return FailureClass.CONNECTION
    if isinstance(exc, OSError):
        return FailureClass.CONNECTION
    return None


_CONNECTION_NAMES = ("Connect", "Network", "Transport", "Protocol", "ReadError", "WriteError",
                     "BrokenResource", "ClosedResource", "IncompleteRead")


def classify_exception(exc: BaseException) -> Failure:
    """Classify a transport-level exception (timeouts, refused/reset connections, stalls)."""
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    if isinstance(status, int) and status >= 400:  # HTTPStatusError and friends
        try:
            body: bytes | None = response.content  # type: ignore[union-attr]
        except Exception:
            body = None
        headers = getattr(response, "headers", None) or {}
        failure = classify_response(status, headers, body)
        if failure is not None:
            return failure
    seen: BaseException | None = exc
    for _ in range(4):  # the exception, then what caused it
        if seen is None:
            break
        cls = _exception_class(seen)
        if cls is not None:
            break
        seen = seen.__cause__ or seen.__context__
    else:
        cls = None
    detail = str(exc) or type(exc).__name__
    if isinstance(exc, StreamIdleTimeout):
        message = detail
    else:
        message = f"{type(exc).__name__}: {detail}" if str(exc) else detail
    return Failure(cls or FailureClass.UNKNOWN, None, _clip(message), None, None)
