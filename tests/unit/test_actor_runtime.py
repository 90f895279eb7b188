"""The actor runtime: mailbox backpressure, call/reply, statistics, supervision, drain on stop.

Time-dependent parts (call timeout, restart backoff) run under ``autojump_clock``: virtual time,
no real sleeping, and the numbers asserted are the configured ones, not measurements.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs
import pytest
import trio
import trio.testing

from sbactor.actors.runtime import (
    Actor,
    ActorCallTimeout,
    ActorClosed,
    ActorCrashed,
    ActorError,
    ActorSystem,
    NotInline,
    Supervision,
)


@attrs.define(eq=False)
class Recorder(Actor):
    """Records messages; a set ``gate`` holds each message until released; "boom" raises."""

    seen: list[Any] = attrs.field(factory=list)
    gate: trio.Event | None = None
    restarted_at: list[float] = attrs.field(factory=list)
    stopped_with: list[Any] | None = None
    batches: list[int] = attrs.field(factory=list)

    async def handle(self, message: Any) -> Any:
        if self.gate is not None:
            await self.gate.wait()
        if message == "boom":
            raise ValueError("boom")
        if isinstance(message, tuple) and message[0] == "sleep":
            await trio.sleep(message[1])
        self.seen.append(message)
        return ("ok", message)

    async def handle_batch(self, messages: Sequence[Any]) -> list[Any]:
        self.batches.append(len(messages))
        return [await self.handle(m) for m in messages]

    async def on_restart(self) -> None:
        self.restarted_at.append(trio.current_time())

    async def on_stop(self) -> None:
        self.stopped_with = list(self.seen)

    def state_summary(self) -> dict[str, Any]:
        return {"seen": len(self.seen)}


async def start(nursery: trio.Nursery, actor: Actor) -> Actor:
    started = await nursery.start(actor.run)
    assert started is actor
    return actor


# ---- backpressure ------------------------------------------------------------------------------


async def test_full_mailbox_blocks_cast_and_cast_nowait_raises(nursery: trio.Nursery) -> None:
    actor = Recorder(name="r", capacity=2, gate=trio.Event())
    await start(nursery, actor)
    await actor.cast(1)  # taken off the mailbox by the actor, which now waits on the gate
    await trio.testing.wait_all_tasks_blocked()
    await actor.cast(2)
    await actor.cast(3)
    assert actor.statistics().depth == 2
    with pytest.raises(trio.WouldBlock):
        actor.cast_nowait(4)

    cast_done = trio.Event()

    async def blocked_sender() -> None:
        await actor.cast(5)
        cast_done.set()

    nursery.start_soon(blocked_sender)
    await trio.testing.wait_all_tasks_blocked()
    assert not cast_done.is_set()  # backpressure: the sender waits for room
    assert actor.statistics().blocked_senders == 1

    assert actor.gate is not None
    actor.gate.set()
    await cast_done.wait()
    await actor.stop()
    assert actor.seen == [1, 2, 3, 5]  # 4 was refused, never queued
    stats = actor.statistics()
    assert stats.processed == 4
    assert stats.blocked_senders == 0
    assert stats.depth == 0


async def test_cast_nowait_succeeds_with_room(nursery: trio.Nursery) -> None:
    actor = Recorder(name="r", capacity=4)
    await start(nursery, actor)
    for i in range(4):
        actor.cast_nowait(i)
    await actor.stop()
    assert actor.seen == [0, 1, 2, 3]


def test_capacity_must_be_positive() -> None:
    with pytest.raises(ValueError, match="capacity must be >= 1"):
        Recorder(name="r", capacity=0)


# ---- call ----------------------------------------------------------------------------------------


async def test_call_returns_the_answer(nursery: trio.Nursery) -> None:
    actor = Recorder(name="r")
    await start(nursery, actor)
    assert await actor.call("hi") == ("ok", "hi")


async def test_call_timeout(nursery: trio.Nursery, autojump_clock: trio.abc.Clock) -> None:
    actor = Recorder(name="r")
    await start(nursery, actor)
    t0 = trio.current_time()
    with pytest.raises(ActorCallTimeout, match=r"did not answer within 1\.5s"):
        await actor.call(("sleep", 10), timeout=1.5)
    assert trio.current_time() - t0 == pytest.approx(1.5)
    # the timed-out reply is dropped safely and the actor keeps serving
    assert await actor.call("after", timeout=60) == ("ok", "after")
    assert actor.statistics().errors == 0
    assert actor.statistics().running


async def test_call_timeout_covers_a_full_mailbox(
    nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    actor = Recorder(name="r", capacity=1, gate=trio.Event())
    await start(nursery, actor)
    await actor.cast(1)
    await trio.testing.wait_all_tasks_blocked()
    await actor.cast(2)  # mailbox full now
    with pytest.raises(ActorCallTimeout):
        await actor.call("x", timeout=2)


async def test_reply_to_cancelled_caller_does_not_crash_actor(nursery: trio.Nursery) -> None:
    actor = Recorder(name="r", gate=trio.Event())
    await start(nursery, actor)
    async with trio.open_nursery() as callers:
        callers.start_soon(actor.call, "abandoned")
        await trio.testing.wait_all_tasks_blocked()
        callers.cancel_scope.cancel()  # the asker goes away before the actor answers
    assert actor.gate is not None
    actor.gate.set()
    assert await actor.call("next") == ("ok", "next")
    stats = actor.statistics()
    assert stats.running
    assert stats.errors == 0
    assert stats.processed == 2
    assert actor.seen == ["abandoned", "next"]


async def test_call_surfaces_handler_error_as_actor_error(nursery: trio.Nursery) -> None:
    actor = Recorder(name="r", restart_backoff_s=0.0)
    await start(nursery, actor)
    with pytest.raises(ActorError, match="actor r failed") as info:
        await actor.call("boom")
    assert isinstance(info.value.__cause__, ValueError)


async def test_messages_after_close_are_refused(nursery: trio.Nursery) -> None:
    actor = Recorder(name="r")
    await start(nursery, actor)
    await actor.stop()
    with pytest.raises(ActorClosed):
        await actor.cast(1)
    with pytest.raises(ActorClosed):
        actor.cast_nowait(1)
    with pytest.raises(ActorClosed):
        await actor.call(1)


# ---- statistics ----------------------------------------------------------------------------------


async def test_statistics_track_depth_peak_processed_errors(nursery: trio.Nursery) -> None:
    actor = Recorder(name="stats", capacity=8, gate=trio.Event(), restart_backoff_s=0.0)
    before = actor.statistics()
    assert (before.running, before.uptime_s, before.processed) == (False, 0.0, 0)
    await start(nursery, actor)
    await actor.cast("first")
    await trio.testing.wait_all_tasks_blocked()
    for m in ("a", "boom", "b", "c"):
        await actor.cast(m)
    stats = actor.statistics()
    assert stats.name == "stats"
    assert stats.capacity == 8
    assert stats.depth == 4
    assert stats.peak_depth == 4
    assert stats.running
    assert stats.supervision == "restart"
    assert stats.state == {"seen": 0}

    assert actor.gate is not None
    actor.gate.set()
    await trio.testing.wait_all_tasks_blocked()  # the actor drained its mailbox
    stats = actor.statistics()
    assert stats.depth == 0
    assert stats.peak_depth == 4  # the peak is remembered
    assert stats.processed == 4  # first, a, b, c; the failed one does not count
    assert stats.errors == 1
    assert stats.last_error == "ValueError: boom"
    assert stats.restarts == 1
    assert stats.state == {"seen": 4}
    assert stats.uptime_s >= 0.0


async def test_actor_system_statistics_and_running(nursery: trio.Nursery) -> None:
    system = ActorSystem()
    a = system.add(Recorder(name="a"))
    b = system.add(Recorder(name="b"))
    assert not system.running
    await system.start_all(nursery)
    assert system.running
    assert [s.name for s in system.statistics()] == ["a", "b"]
    await a.cast(1)
    await b.call(2)
    await system.stop_all()
    assert not system.running


# ---- supervision ---------------------------------------------------------------------------------


async def test_restart_backs_off_exponentially_and_keeps_serving(
    nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    actor = Recorder(name="r", restart_backoff_s=1.0, restart_backoff_max_s=3.0)
    await start(nursery, actor)
    t0 = trio.current_time()
    for _ in range(4):
        await actor.cast("boom")
    assert await actor.call("alive", timeout=60) == ("ok", "alive")
    # backoffs 1, 2, 3 (capped), 3 → on_restart after each
    offsets = [round(t - t0, 6) for t in actor.restarted_at]
    assert offsets == [1.0, 3.0, 6.0, 9.0]
    stats = actor.statistics()
    assert (stats.restarts, stats.errors, stats.processed) == (4, 4, 1)
    assert stats.running

    # a success resets the backoff to its base
    await actor.cast("boom")
    t1 = trio.current_time()
    await actor.call("again", timeout=60)
    assert actor.restarted_at[-1] - t1 == pytest.approx(1.0)


async def test_escalate_propagates_actor_crashed() -> None:
    actor = Recorder(name="ledger", supervision=Supervision.ESCALATE)
    with pytest.raises(ExceptionGroup) as info:
        async with trio.open_nursery() as nursery:
            await nursery.start(actor.run)
            await actor.cast("fine")
            await actor.cast("boom")
            await trio.sleep_forever()
    crashed = info.value.subgroup(ActorCrashed)
    assert crashed is not None
    error = crashed.exceptions[0]
    assert "actor ledger crashed" in str(error)
    assert isinstance(error.__cause__, ValueError)
    stats = actor.statistics()
    assert not stats.running
    assert stats.errors == 1
    assert stats.supervision == "escalate"
    assert actor.stopped_with == ["fine"]  # on_stop still ran
    with pytest.raises(ActorClosed):  # fails closed: no more messages accepted
        await actor.cast("after")


async def test_escalate_answers_the_failing_call_before_crashing() -> None:
    actor = Recorder(name="ledger", supervision=Supervision.ESCALATE)
    errors: list[BaseException] = []

    async def caller() -> None:
        try:
            await actor.call("boom")
        except ActorError as exc:
            errors.append(exc)

    with pytest.raises(ExceptionGroup):
        async with trio.open_nursery() as nursery:
            await nursery.start(actor.run)
            nursery.start_soon(caller)
            await trio.sleep_forever()
    assert len(errors) == 1


# ---- stop drains ---------------------------------------------------------------------------------


async def test_stop_drains_everything_accepted(nursery: trio.Nursery) -> None:
    actor = Recorder(name="r", capacity=100, gate=trio.Event())
    await start(nursery, actor)
    for i in range(50):
        actor.cast_nowait(i)
    assert actor.gate is not None
    actor.gate.set()
    await actor.stop()
    assert actor.seen == list(range(50))
    assert actor.stopped_with == list(range(50))  # on_stop ran after the last message
    assert not actor.statistics().running


async def test_stop_wakes_blocked_senders_without_losing_their_messages(
    nursery: trio.Nursery,
) -> None:
    actor = Recorder(name="r", capacity=1, gate=trio.Event())
    await start(nursery, actor)
    await actor.cast(0)
    await trio.testing.wait_all_tasks_blocked()
    await actor.cast(1)
    outcomes: list[str] = []

    async def sender(i: int) -> None:
        try:
            await actor.cast(i)
            outcomes.append("sent")
        except ActorClosed:
            outcomes.append("refused")

    for i in (2, 3):
        nursery.start_soon(sender, i)
    await trio.testing.wait_all_tasks_blocked()
    assert actor.statistics().blocked_senders == 2
    assert actor.gate is not None
    actor.gate.set()
    await actor.stop()
    # whatever a sender was told "sent" really was handled; nothing accepted was dropped
    assert len(actor.seen) == 2 + outcomes.count("sent")
    assert len(outcomes) == 2  # each blocked sender got an answer, none hangs


async def test_stop_before_start_does_not_hang() -> None:
    actor = Recorder(name="r")
    with trio.fail_after(1):
        await actor.stop()


async def test_system_stops_in_reverse_order(nursery: trio.Nursery) -> None:
    order: list[str] = []

    @attrs.define(eq=False)
    class Named(Recorder):
        async def on_stop(self) -> None:
            order.append(self.name)

    system = ActorSystem()
    for name in ("ledger", "sink", "feedback"):
        system.add(Named(name=name))
    await system.start_all(nursery)
    await system.stop_all()
    assert order == ["feedback", "sink", "ledger"]


# ---- batches -------------------------------------------------------------------------------------


async def test_batch_handling_groups_queued_messages(nursery: trio.Nursery) -> None:
    actor = Recorder(name="batch", capacity=64, batch_size=8, gate=trio.Event())
    await start(nursery, actor)
    await actor.cast("first")
    await trio.testing.wait_all_tasks_blocked()
    for i in range(20):
        actor.cast_nowait(i)
    assert actor.gate is not None
    actor.gate.set()
    answer = await actor.call("last")
    assert answer == ("ok", "last")
    await actor.stop()
    assert actor.batches[0] == 1  # "first" was alone in the mailbox
    assert actor.batches[1:] == [8, 8, 5]  # 20 + the call, at most batch_size per batch
    assert actor.seen == ["first", *range(20), "last"]
    assert actor.statistics().processed == 22


async def test_failing_batch_answers_every_caller_with_an_error(nursery: trio.Nursery) -> None:
    actor = Recorder(name="batch", capacity=8, batch_size=4, gate=trio.Event(),
                     restart_backoff_s=0.0)
    await start(nursery, actor)
    await actor.cast("hold")
    await trio.testing.wait_all_tasks_blocked()
    results: dict[str, str] = {}

    async def ask(message: str) -> None:
        try:
            await actor.call(message)
            results[message] = "ok"
        except ActorError:
            results[message] = "error"

    async with trio.open_nursery() as callers:
        for m in ("x", "boom", "y"):
            callers.start_soon(ask, m)
            await trio.testing.wait_all_tasks_blocked()
        assert actor.gate is not None
        actor.gate.set()
    assert results == {"x": "error", "boom": "error", "y": "error"}
    stats = actor.statistics()
    assert stats.errors == 1
    assert stats.restarts == 1
    assert stats.running


async def test_post_does_not_yield_with_room_and_waits_when_full(nursery: trio.Nursery) -> None:
    actor = Recorder(name="r", capacity=1, gate=trio.Event())
    await start(nursery, actor)
    with trio.testing.assert_no_checkpoints():
        await actor.post(1)  # room: enqueued without a checkpoint
    await trio.testing.wait_all_tasks_blocked()  # the actor took 1 and waits on the gate
    await actor.post(2)
    posted = trio.Event()

    async def poster() -> None:
        await actor.post(3)
        posted.set()

    nursery.start_soon(poster)
    await trio.testing.wait_all_tasks_blocked()
    assert not posted.is_set()  # full: backpressure like cast
    assert actor.gate is not None
    actor.gate.set()
    await posted.wait()
    await actor.stop()
    assert actor.seen == [1, 2, 3]


# ---- inline calls (handle_now) ------------------------------------------------------------


@attrs.define(eq=False)
class Inliner(Recorder):
    """Answers ("now", msg) inline for strings starting with "now"; "now-boom" raises."""

    def handle_now(self, message: Any) -> Any:
        if not (isinstance(message, str) and message.startswith("now")):
            raise NotInline
        if message == "now-boom":
            raise ValueError("inline boom")
        self.seen.append(message)
        return ("now", message)


async def _started(actor: Actor, nursery: trio.Nursery) -> Actor:
    await nursery.start(actor.run)
    await trio.testing.wait_all_tasks_blocked()  # the actor is parked on its empty mailbox
    return actor


async def test_call_on_idle_actor_runs_handle_now_inline() -> None:
    async with trio.open_nursery() as nursery:
        actor = await _started(Inliner("inl"), nursery)
        assert await actor.call("now-1") == ("now", "now-1")
        assert await actor.call("plain") == ("ok", "plain")  # NotInline: through the mailbox
        stats = actor.statistics()
        assert (stats.inlined, stats.processed) == (1, 2)
        await actor.stop()


async def test_a_queued_message_is_never_overtaken_by_an_inline_call() -> None:
    async with trio.open_nursery() as nursery:
        actor = await _started(Inliner("inl"), nursery)
        actor.cast_nowait("first")  # handed to the parked actor, not yet handled
        assert await actor.call("now-2") == ("ok", "now-2")  # answered by handle, in order
        assert actor.seen == ["first", "now-2"]
        assert actor.statistics().inlined == 0
        await actor.stop()


async def test_inline_error_is_the_callers_and_the_actor_keeps_serving() -> None:
    async with trio.open_nursery() as nursery:
        actor = await _started(Inliner("inl"), nursery)
        with pytest.raises(ActorError, match="inline boom"):
            await actor.call("now-boom")
        stats = actor.statistics()
        assert stats.errors == 1 and stats.running
        assert await actor.call("now-3") == ("now", "now-3")
        await actor.stop()


async def test_closed_or_escalating_actors_never_answer_inline() -> None:
    async with trio.open_nursery() as nursery:
        closing = await _started(Inliner("closing"), nursery)
        closing.close()
        with pytest.raises(ActorClosed):
            await closing.call("now-4")
        strict = await _started(Inliner("strict", supervision=Supervision.ESCALATE), nursery)
        assert await strict.call("now-5") == ("ok", "now-5")
        assert strict.statistics().inlined == 0  # an error must be able to crash the gateway
        await strict.stop()


async def test_a_cancelled_caller_never_runs_the_inline_handler() -> None:
    async with trio.open_nursery() as nursery:
        actor = await _started(Inliner("inl"), nursery)
        with trio.CancelScope() as scope:
            scope.cancel()
            await actor.call("now-cancelled")
        assert scope.cancelled_caught
        assert actor.seen == [] and actor.statistics().inlined == 0
        await actor.stop()


async def test_cast_to_an_idle_actor_runs_handle_now_and_never_raises_its_error() -> None:
    async with trio.open_nursery() as nursery:
        actor = await _started(Inliner("inl"), nursery)
        actor.cast_nowait("now-a")  # handled before cast_nowait returns
        assert actor.seen == ["now-a"] and actor.statistics().inlined == 1
        actor.cast_nowait("now-boom")  # the sender is not the one to hear of it
        stats = actor.statistics()
        assert stats.errors == 1 and "inline boom" in (stats.last_error or "")
        actor.cast_nowait("queued")  # NotInline: through the mailbox, handled later
        assert actor.seen == ["now-a"]
        await trio.testing.wait_all_tasks_blocked()
        assert actor.seen == ["now-a", "queued"]
        await actor.stop()
