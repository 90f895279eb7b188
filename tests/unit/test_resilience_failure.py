"""Classifier table: real-shaped OpenAI, Anthropic, Azure, Google and text error bodies."""

from __future__ import annotations

import email.utils
from typing import Any

import httpx2
import pytest
import trio

from sbactor.resilience import (
    FailureClass,
    StreamIdleTimeout,
    classify_chunk,
    classify_exception,
    classify_response,
    parse_retry_after,
)

F = FailureClass


def oai(message: str, type_: str | None, code: str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": None, "code": code}}


def ant(type_: str, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": type_, "message": message}}


CASES: list[tuple[str, int, Any, FailureClass, str | None]] = [
    # --- OpenAI
    ("openai 429 rate limit", 429,
     oai("Rate limit reached for gpt-4o in organization org-x on tokens per min (TPM): "
         "Limit 30000, Used 29000, Requested 2000.", "tokens", "rate_limit_exceeded"),
     F.RATE_LIMIT, "rate_limit_exceeded"),
    ("openai 429 insufficient quota is not a rate limit", 429,
     oai("You exceeded your current quota, please check your plan and billing details.",
         "insufficient_quota", "insufficient_quota"), F.AUTH, "insufficient_quota"),
    ("openai 400 context length", 400,
     oai("This model's maximum context length is 128000 tokens. However, your messages resulted "
         "in 130412 tokens. Please reduce the length of the messages.",
         "invalid_request_error", "context_length_exceeded"),
     F.CONTEXT_WINDOW, "context_length_exceeded"),
    ("openai 400 context, code missing", 400,
     oai("This model's maximum context length is 8192 tokens, however you requested 9000 tokens",
         "invalid_request_error", None), F.CONTEXT_WINDOW, "invalid_request_error"),
    ("openai 401 bad key", 401,
     oai("Incorrect API key provided: sk-abc***. You can find your API key at "
         "https://platform.openai.com/account/api-keys.", "invalid_request_error",
         "invalid_api_key"), F.AUTH, "invalid_api_key"),
    ("openai 403 region", 403,
     oai("Country, region, or territory not supported", "request_forbidden",
         "unsupported_country_region_territory"), F.AUTH, None),
    ("openai 404 model", 404,
     oai("The model `gpt-5-turbo` does not exist or you do not have access to it.",
         "invalid_request_error", "model_not_found"), F.NOT_FOUND, "model_not_found"),
    ("openai 400 invalid param", 400,
     oai("Invalid value for 'temperature': expected a number <= 2.", "invalid_request_error",
         "invalid_value"), F.BAD_REQUEST, "invalid_value"),
    ("openai 400 image content policy", 400,
     oai("Your request was rejected as a result of our safety system.",
         "invalid_request_error", "content_policy_violation"), F.CONTENT_POLICY, None),
    ("openai 500", 500,
     oai("The server had an error while processing your request. Sorry about that!",
         "server_error", None), F.SERVER_ERROR, "server_error"),
    ("openai 503 overloaded", 503,
     oai("The engine is currently overloaded, please try again later", "server_error", None),
     F.SERVER_ERROR, None),
    ("mock overloaded 529 (openai shape)", 529, oai("Overloaded (mock).", "overloaded_error",
                                                     "overloaded"), F.SERVER_ERROR, "overloaded"),
    # --- Azure OpenAI
    ("azure content filter 400", 400,
     {"error": {"message": "The response was filtered due to the prompt triggering Azure "
                "OpenAI's content management policy.", "type": None, "param": "prompt",
                "code": "content_filter", "status": 400,
                "innererror": {"code": "ResponsibleAIPolicyViolation"}}},
     F.CONTENT_POLICY, "content_filter"),
    ("azure deployment not found", 404,
     {"error": {"code": "DeploymentNotFound",
                "message": "The API deployment for this resource does not exist."}},
     F.NOT_FOUND, "deploymentnotfound"),
    ("azure 429 text message", 429,
     {"error": {"code": "429", "message": "Requests to the ChatCompletions_Create Operation "
                "have exceeded call rate limit. Please retry after 7 seconds."}},
     F.RATE_LIMIT, None),
    # --- Anthropic
    ("anthropic 529 overloaded", 529, ant("overloaded_error", "Overloaded"), F.SERVER_ERROR,
     "overloaded_error"),
    ("anthropic 429", 429, ant("rate_limit_error", "Number of request tokens has exceeded your "
                               "per-minute rate limit"), F.RATE_LIMIT, "rate_limit_error"),
    ("anthropic prompt too long", 400,
     ant("invalid_request_error", "prompt is too long: 210345 tokens > 200000 maximum"),
     F.CONTEXT_WINDOW, "invalid_request_error"),
    ("anthropic 413 too large", 413,
     ant("request_too_large", "Request exceeds the maximum allowed number of bytes."),
     F.CONTEXT_WINDOW, "request_too_large"),
    ("anthropic 401", 401, ant("authentication_error", "invalid x-api-key"), F.AUTH, None),
    ("anthropic 403", 403, ant("permission_error", "Your API key does not have permission"),
     F.AUTH, None),
    ("anthropic 404", 404, ant("not_found_error", "model: claude-9"), F.NOT_FOUND, None),
    ("anthropic 500", 500, ant("api_error", "Internal server error"), F.SERVER_ERROR, None),
    ("anthropic 400 bad", 400, ant("invalid_request_error", "messages: roles must alternate"),
     F.BAD_REQUEST, "invalid_request_error"),
    ("anthropic 402 billing", 402, ant("billing_error", "credit balance is too low"), F.AUTH,
     None),
    # --- Google
    ("gemini resource exhausted", 429,
     {"error": {"code": 429, "message": "Resource has been exhausted (e.g. check quota).",
                "status": "RESOURCE_EXHAUSTED"}}, F.RATE_LIMIT, None),
    ("gemini invalid argument", 400,
     {"error": {"code": 400, "message": "Invalid JSON payload received.",
                "status": "INVALID_ARGUMENT"}}, F.BAD_REQUEST, None),
    ("gemini deadline", 504, {"error": {"code": 504, "message": "Deadline expired",
                                        "status": "DEADLINE_EXCEEDED"}}, F.TIMEOUT, None),
    # --- statuses and text bodies
    ("408", 408, b"", F.TIMEOUT, None),
    ("504 html", 504, b"<html><body>504 Gateway Time-out</body></html>", F.TIMEOUT, None),
    ("502 text", 502, "Bad Gateway", F.SERVER_ERROR, None),
    ("text rate limit on 400", 400, "rate limit exceeded, slow down", F.RATE_LIMIT, None),
    ("text context on 500", 500, "Input is too long for requested model.", F.CONTEXT_WINDOW,
     None),
    ("malformed json 500", 500, b"{not json", F.SERVER_ERROR, None),
    ("empty 418", 418, None, F.BAD_REQUEST, None),
    ("200 carrying an error", 200, oai("upstream overloaded", "server_error", None),
     F.SERVER_ERROR, None),
    # --- 200s that are refusals
    ("openai content_filter finish", 200,
     {"choices": [{"index": 0, "message": {"role": "assistant", "content": ""},
                   "finish_reason": "content_filter"}]}, F.CONTENT_POLICY, "content_filter"),
    ("openai refusal", 200,
     {"choices": [{"index": 0, "message": {"role": "assistant", "content": None,
                                           "refusal": "I can't help with that."},
                   "finish_reason": "stop"}]}, F.CONTENT_POLICY, "refusal"),
    ("anthropic refusal stop", 200,
     {"type": "message", "content": [], "stop_reason": "refusal"}, F.CONTENT_POLICY, "refusal"),
]


@pytest.mark.parametrize(("name", "status", "body", "cls", "code"), CASES,
                         ids=[c[0] for c in CASES])
def test_classifier_table(name: str, status: int, body: Any, cls: FailureClass,
                          code: str | None) -> None:
    failure = classify_response(status, {}, body)
    assert failure is not None, name
    assert failure.cls is cls, (name, failure)
    if code is not None:
        assert failure.code == code
    assert failure.status == status
    assert "\n" not in failure.message and len(failure.message) <= 500


def test_table_is_large_enough() -> None:
    assert len(CASES) >= 25


@pytest.mark.parametrize("body", [
    {"choices": [{"index": 0, "message": {"role": "assistant", "content": "hi", "refusal": None},
                  "finish_reason": "stop"}]},
    b'{"id": "x", "choices": []}',
    {"type": "message", "content": [{"type": "text", "text": "hi"}], "stop_reason": "end_turn"},
    None,
])
def test_success_is_none(body: Any) -> None:
    assert classify_response(200, {}, body) is None


def test_bytes_and_str_and_mapping_agree() -> None:
    import orjson

    body = oai("Rate limit", "requests", "rate_limit_exceeded")
    raw = orjson.dumps(body)
    a = classify_response(429, {}, body)
    assert a == classify_response(429, {}, raw) == classify_response(429, {}, raw.decode())


def test_retry_after_seconds_ms_and_date() -> None:
    assert parse_retry_after({"Retry-After": "7"}) == 7.0
    assert parse_retry_after({"retry-after-ms": "1500", "retry-after": "9"}) == 1.5
    wall = 1_700_000_000.0
    date = email.utils.formatdate(wall + 12, usegmt=True)
    assert parse_retry_after({"retry-after": date}, wall_now=wall) == pytest.approx(12, abs=1)
    assert parse_retry_after({"retry-after": "soon"}) is None
    assert parse_retry_after({}) is None


def test_retry_after_from_openai_ratelimit_reset() -> None:
    headers = {"x-ratelimit-remaining-requests": "10", "x-ratelimit-reset-requests": "1s",
               "x-ratelimit-remaining-tokens": "0", "x-ratelimit-reset-tokens": "6m0s"}
    assert parse_retry_after(headers) == 360.0
    assert parse_retry_after({"x-ratelimit-reset-requests": "20ms"}) == pytest.approx(0.02)
    assert parse_retry_after({"x-ratelimit-reset-tokens": "1m30.5s"}) == pytest.approx(90.5)


def test_retry_after_attached_to_rate_limits_only() -> None:
    f = classify_response(429, {"retry-after": "3"}, oai("slow", "requests",
                                                         "rate_limit_exceeded"))
    assert f is not None and f.retry_after_s == 3.0
    f = classify_response(400, {"retry-after": "3"}, oai("bad", "invalid_request_error", None))
    assert f is not None and f.retry_after_s is None


@pytest.mark.parametrize(("exc", "cls"), [
    (httpx2.ReadTimeout("read timed out"), F.TIMEOUT),
    (httpx2.ConnectTimeout("connect timed out"), F.TIMEOUT),
    (httpx2.PoolTimeout("pool"), F.TIMEOUT),
    (httpx2.ConnectError("All connection attempts failed"), F.CONNECTION),
    (httpx2.ReadError("connection reset"), F.CONNECTION),
    (httpx2.RemoteProtocolError("peer closed connection without sending complete message body"),
     F.CONNECTION),
    (StreamIdleTimeout("no chunk for 60s"), F.TIMEOUT),
    (trio.TooSlowError(), F.TIMEOUT),
    (trio.BrokenResourceError(), F.CONNECTION),
    (ConnectionResetError(104, "reset"), F.CONNECTION),
    (TimeoutError(), F.TIMEOUT),
    (type("WeirdReadTimeout", (Exception,), {})("x"), F.TIMEOUT),
    (type("FooConnectError", (Exception,), {})("x"), F.CONNECTION),
    (ValueError("boom"), F.UNKNOWN),
])
def test_classify_exception(exc: BaseException, cls: FailureClass) -> None:
    failure = classify_exception(exc)
    assert failure.cls is cls
    assert failure.status is None and failure.message


def test_classify_exception_follows_cause() -> None:
    try:
        try:
            raise httpx2.ConnectError("refused")
        except httpx2.ConnectError as inner:
            raise RuntimeError("provider call failed") from inner
    except RuntimeError as outer:
        assert classify_exception(outer).cls is F.CONNECTION


def test_classify_exception_http_status_error() -> None:
    request = httpx2.Request("POST", "http://x/v1/chat/completions")
    response = httpx2.Response(429, headers={"retry-after": "2"},
                               json=oai("slow", "requests", "rate_limit_exceeded"),
                               request=request)
    exc = httpx2.HTTPStatusError("429", request=request, response=response)
    failure = classify_exception(exc)
    assert failure.cls is F.RATE_LIMIT and failure.retry_after_s == 2.0


@pytest.mark.parametrize(("chunk", "cls"), [
    ({"error": {"message": "overloaded", "type": "server_error", "code": None}}, F.SERVER_ERROR),
    ({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}},
     F.SERVER_ERROR),
    ({"choices": [{"index": 0, "delta": {}, "finish_reason": "content_filter"}]},
     F.CONTENT_POLICY),
    ({"type": "message_delta", "delta": {"stop_reason": "refusal"}}, F.CONTENT_POLICY),
    ({"error": {"message": "Rate limited", "code": 429, "status": "RESOURCE_EXHAUSTED"}},
     F.RATE_LIMIT),
])
def test_classify_chunk_failures(chunk: dict[str, Any], cls: FailureClass) -> None:
    failure = classify_chunk(chunk)
    assert failure is not None and failure.cls is cls


@pytest.mark.parametrize("chunk", [
    {"choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": None}]},
    {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
    {"choices": [], "usage": {"prompt_tokens": 1}},
    {"type": "message_delta", "delta": {"stop_reason": "end_turn"}},
    {"type": "ping"},
])
def test_classify_chunk_normal(chunk: dict[str, Any]) -> None:
    assert classify_chunk(chunk) is None
