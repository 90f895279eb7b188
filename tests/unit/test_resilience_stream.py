"""The stream rule: failover until the first byte reaches the client, then an error chunk."""

from __future__ import annotations

import random
from typing import Any

import orjson
import trio

from sbactor.resilience import (
    AttemptPlanner,
    Done,
    Failure,
    FailureClass,
    FallbackEntry,
    FallbackTable,
    ResilienceConfig,
    StreamGuard,
    StreamIdleTimeout,
    Try,
    classify_exception,
    stream_error_sse,
)

F = FailureClass


def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


ROLE = chunk({"role": "assistant", "content": ""})
HELLO = chunk({"content": "Hello"})
WORLD = chunk({"content": " world"})
STOP = chunk({}, "stop")


def test_role_chunk_is_held_until_content() -> None:
    g = StreamGuard()
    assert g.feed(ROLE) == ([], None) and not g.committed
    out, failure = g.feed(HELLO)
    assert out == [ROLE, HELLO] and failure is None and g.committed
    assert g.feed(WORLD) == ([WORLD], None)
    assert g.feed(STOP) == ([STOP], None)
    assert g.finish() == []
    assert g.statistics().released == 4


def test_failure_before_first_byte_fails_over() -> None:
    g = StreamGuard()
    g.feed(ROLE)
    failure = classify_exception(ConnectionResetError("peer reset"))
    assert g.on_failure(failure) == "failover"


def test_content_filter_before_content_fails_over_but_after_passes_through() -> None:
    g = StreamGuard()
    g.feed(ROLE)
    out, failure = g.feed(chunk({}, "content_filter"))
    assert out == [] and failure is not None and failure.cls is F.CONTENT_POLICY
    g2 = StreamGuard()
    g2.feed(HELLO)
    filtered = chunk({}, "content_filter")
    assert g2.feed(filtered) == ([filtered], None)


def test_error_chunk_after_commit_terminates() -> None:
    g = StreamGuard()
    g.feed(HELLO)
    out, failure = g.feed({"error": {"message": "overloaded", "type": "server_error"}})
    assert out == [] and failure is not None and g.on_failure(failure) == "terminate"


def test_empty_answer_is_flushed_at_end() -> None:
    g = StreamGuard()
    g.feed(ROLE)
    assert g.finish() == [ROLE]


async def fake_stream(cut_after: int | None, stall_after: int | None) -> Any:
    for i, c in enumerate([ROLE, HELLO, WORLD, STOP]):
        if cut_after is not None and i == cut_after:
            raise ConnectionResetError("peer closed connection without sending complete body")
        if stall_after is not None and i == stall_after:
            await trio.sleep_forever()
        yield c


async def serve_stream(attempt_faults: list[tuple[int | None, int | None]],
                       idle_timeout: float = 5.0) -> tuple[list[bytes], AttemptPlanner]:
    """The gateway's stream loop in miniature: planner + guard + idle timeout, on trio."""
    cfg = ResilienceConfig(stream_idle_timeout_s=idle_timeout)
    table = FallbackTable({"m": FallbackEntry(fallbacks=("n",)), "n": FallbackEntry()})
    plan = AttemptPlanner(config=cfg, model="m", fallbacks=table, rng=random.Random(1),
                          started_at=trio.current_time())
    sent: list[bytes] = []
    n = 0
    while True:
        step = plan.next_step(trio.current_time())
        if not isinstance(step, Try):
            break
        await trio.sleep(step.delay_s)
        guard = StreamGuard()
        cut, stall = attempt_faults[n] if n < len(attempt_faults) else (None, None)
        n += 1
        failure: Failure | None = None
        stream = fake_stream(cut, stall).__aiter__()
        try:
            while True:
                with trio.fail_after(cfg.stream_idle_timeout_s):
                    try:
                        c = await stream.__anext__()
                    except StopAsyncIteration:
                        break
                out, failure = guard.feed(c)
                sent += [b"data: " + orjson.dumps(x) + b"\n\n" for x in out]
                if failure is not None:
                    break
        except trio.TooSlowError:
            failure = classify_exception(StreamIdleTimeout("no chunk for 5s"))
        except ConnectionResetError as exc:
            failure = classify_exception(exc)
        if failure is None:
            sent += [b"data: " + orjson.dumps(x) + b"\n\n" for x in guard.finish()]
            sent.append(b"data: [DONE]\n\n")
        plan.record(f"{step.model}-1", step.model, failure, trio.current_time())
        if failure is not None and guard.on_failure(failure) == "terminate":
            sent.append(stream_error_sse(failure, model=step.model, completion_id="c", created=1))
            break
    return sent, plan


async def test_cut_before_first_byte_fails_over(autojump_clock: trio.abc.Clock) -> None:
    sent, plan = await serve_stream([(1, None)])  # cut after the role chunk, before content
    assert sent[-1] == b"data: [DONE]\n\n"
    assert b"Hello" in b"".join(sent) and sent.count(sent[0]) == 1  # one role chunk only
    assert [a.cls for a in plan.attempts] == [F.CONNECTION, None]
    assert isinstance(plan.next_step(trio.current_time()), Done)


async def test_cut_mid_stream_ends_with_error_chunk(autojump_clock: trio.abc.Clock) -> None:
    sent, plan = await serve_stream([(2, None)])  # "Hello" sent, then cut
    assert len(plan.attempts) == 1
    assert b"[DONE]" not in b"".join(sent)
    last = orjson.loads(sent[-1][len(b"data: "):])
    assert last["error"]["code"] == "upstream_unreachable"


async def test_stall_counts_as_timeout(autojump_clock: trio.abc.Clock) -> None:
    start = trio.current_time()
    sent, plan = await serve_stream([(None, 1)], idle_timeout=5.0)  # stall before content
    assert [a.cls for a in plan.attempts] == [F.TIMEOUT, None]
    assert trio.current_time() - start < 10 and sent[-1] == b"data: [DONE]\n\n"
    sent2, plan2 = await serve_stream([(None, 2)], idle_timeout=5.0)  # stall mid-stream
    assert [a.cls for a in plan2.attempts] == [F.TIMEOUT]
    assert b"upstream_timeout" in sent2[-1]
