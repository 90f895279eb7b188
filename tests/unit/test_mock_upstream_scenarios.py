"""Pure scenario rules shared by the mock provider and the mock server."""

from __future__ import annotations

import pytest

from sbactor.upstream_mock import scenarios as sc


def body(text: str, model: str = "m", **extra: object) -> dict[str, object]:
    return {"model": model, "messages": [{"role": "system", "content": "be nice"},
                                         {"role": "user", "content": text}], **extra}


def test_parse_markers_merges_groups() -> None:
    m = sc.parse_markers("x [mock:status=429,times=1,id=abc] y [mock:only_model=gpt]")
    assert (m.status, m.times, m.id, m.only_model) == (429, 1, "abc", "gpt")
    m = sc.parse_markers("[mock:context_length][mock:stall=250,latency=10]")
    assert m.context_length and m.stall_ms == 250 and m.latency_ms == 10


@pytest.mark.parametrize("bad", ["[mock:status=abc]", "[mock:nonsense]", "[mock:refusal=1]"])
def test_parse_markers_rejects_malformed(bad: str) -> None:
    with pytest.raises(sc.MarkerError):
        sc.parse_markers(bad)


def test_deterministic_text_and_usage() -> None:
    e = sc.ScenarioEngine()
    a, b = e.decide(body("hello")), e.decide(body("hello"))
    assert a.text == b.text and a.text.startswith("Mock reply from m:")
    assert e.decide(body("other")).text != a.text
    assert a.completion_tokens == sc.count_tokens(a.text)
    assert a.prompt_tokens >= 2 and not a.is_error


def test_times_with_id_fails_first_n_then_succeeds() -> None:
    e = sc.ScenarioEngine()
    req = body("[mock:status=429,times=2,id=t1]")
    assert [e.decide(req).status for _ in range(4)] == [429, 429, 200, 200]
    # another id has its own counter
    assert e.decide(body("[mock:status=429,times=1,id=t2]")).status == 429


def test_only_model_condition() -> None:
    e = sc.ScenarioEngine()
    assert e.decide(body("[mock:status=503,only_model=a]", model="a")).status == 503
    assert e.decide(body("[mock:status=503,only_model=a]", model="b")).status == 200


@pytest.mark.parametrize(
    ("marker", "status", "kind"),
    [("auth", 401, "auth"), ("overloaded", 529, "overloaded"),
     ("context_length", 400, "context_length"), ("retry_after=7", 429, "rate_limit"),
     ("status=500", 500, "server")],
)
def test_error_markers(marker: str, status: int, kind: str) -> None:
    d = sc.ScenarioEngine().decide(body(f"[mock:{marker}]"))
    assert (d.status, d.error_kind) == (status, kind)


def test_error_rendering() -> None:
    d = sc.ScenarioEngine().decide(body("[mock:context_length]"))
    assert sc.render_openai_error(d)["error"]["code"] == "context_length_exceeded"
    assert sc.render_anthropic_error(d)["error"]["type"] == "invalid_request_error"
    d = sc.ScenarioEngine().decide(body("[mock:overloaded]"))
    assert sc.render_anthropic_error(d)["error"]["type"] == "overloaded_error"
    d = sc.ScenarioEngine().decide(body("[mock:retry_after=3]"))
    assert sc.error_headers(d) == {"retry-after": "3"}


def test_refusal_and_content_filter() -> None:
    e = sc.ScenarioEngine()
    r = sc.render_openai_completion(e.decide(body("[mock:refusal]")), "1", 0)
    assert r["choices"][0]["message"]["refusal"] == sc.REFUSAL_TEXT
    assert r["choices"][0]["message"]["content"] is None
    cf = sc.render_openai_completion(e.decide(body("[mock:content_filter]")), "1", 0)
    assert cf["choices"][0]["finish_reason"] == "content_filter"


def test_rates_are_seeded() -> None:
    def run() -> list[int]:
        e = sc.ScenarioEngine(sc.Settings(fail_rate=0.5, fail_status=503, seed=7))
        return [e.decide(body("x")).status for _ in range(40)]

    first = run()
    assert first == run() and {200, 503} == set(first)


def test_chunks_join_to_text_and_usage_chunk() -> None:
    d = sc.ScenarioEngine().decide(body("hi"))
    chunks = list(sc.render_openai_chunks(d, "1", 0, include_usage=True))
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1])
    assert text == d.text
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0


def test_anthropic_events_in_real_order() -> None:
    d = sc.ScenarioEngine().decide(body("hi", max_tokens=3))
    names = [n for n, _ in sc.render_anthropic_events(d, "1")]
    assert names[:3] == ["message_start", "ping", "content_block_start"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]


def test_tokens_marker_and_cut() -> None:
    d = sc.ScenarioEngine().decide(body("[mock:tokens=2,cut_stream=3]"))
    assert d.cut_after == 3 and len(d.text.split(" ")) <= 6
    assert sc.ScenarioEngine().decide(body("[mock:cut_before_first]")).cut_after == 0


def test_embeddings_deterministic() -> None:
    a = sc.render_embeddings({"model": "e", "input": ["a", "b"]})
    assert len(a["data"]) == 2 and a == sc.render_embeddings({"model": "e", "input": ["a", "b"]})
