"""FeedbackStore actor: outcomes, verified feedback, snapshots, routing view, closed loop."""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import AsyncIterator

import pytest
import trio
import trio.testing

from sbactor.actors.feedback_store import FeedbackStore
from sbactor.routing import Candidate, NoCandidates, Outcome, RoutingSettings, score

GOOD = Candidate("m/good/0", "good", "up", input_per_mtok=1.0, output_per_mtok=2.0)
BAD = Candidate("m/bad/1", "bad", "up", input_per_mtok=1.0, output_per_mtok=2.0)


@pytest.fixture
async def store(autojump_clock: trio.testing.MockClock) -> AsyncIterator[FeedbackStore]:
    async with trio.open_nursery() as nursery:
        s = await nursery.start(FeedbackStore(settings=RoutingSettings(feedback_capacity=50),
                                              rng=random.Random(1)).run)
        yield s
        await s.stop()


def ok(rid: str, dep: str = GOOD.deployment_id, cost: float = 0.01) -> Outcome:
    return Outcome(rid, dep, "m", success=True, cost_usd=cost, latency_s=0.2)


async def settle() -> None:
    await trio.testing.wait_all_tasks_blocked()


async def test_outcomes_update_an_immutable_snapshot(store: FeedbackStore) -> None:
    before = store.stats_snapshot()
    await store.record_outcome(ok("r1"))
    store.record_outcome_nowait(ok("r2", cost=0.03))
    await settle()
    after = store.stats_snapshot()
    assert before == {}  # the old snapshot was not mutated
    st = after[GOOD.deployment_id]
    assert st.samples == 2 and st.ewma_cost == pytest.approx(0.014)
    with pytest.raises(TypeError):
        after["x"] = st  # type: ignore[index]
    assert store.statistics().state["outcomes"] == 2


async def test_feedback_applied_unknown_duplicate(store: FeedbackStore) -> None:
    await store.record_outcome(ok("r1"))
    await store.record_outcome(ok("r2"))
    await settle()
    s0 = score(store.stats_snapshot()[GOOD.deployment_id])
    res = await store.feedback("r1", "failure")
    assert (res.status, res.deployment_id, res.model) == ("applied", GOOD.deployment_id, "m")
    s1 = score(store.stats_snapshot()[GOOD.deployment_id])
    assert s1 > s0  # a verified failure makes the deployment look worse
    assert (await store.feedback("r1", "success")).status == "duplicate"
    assert score(store.stats_snapshot()[GOOD.deployment_id]) == s1  # duplicate ignored
    res = await store.feedback("r2", "success", 1.0)
    assert res.status == "applied" and score(store.stats_snapshot()[GOOD.deployment_id]) < s1
    assert (await store.feedback("nope", "success")).status == "unknown"
    assert store.statistics().state["feedback"] == {"applied": 2, "unknown": 1, "duplicate": 1}


async def test_feedback_validation(store: FeedbackStore) -> None:
    with pytest.raises(ValueError, match="outcome must be 'success' or 'failure'"):
        await store.feedback("r1", "great")
    with pytest.raises(ValueError, match="score must be between 0 and 1"):
        await store.feedback("r1", "success", 1.5)
    with pytest.raises(ValueError, match="score must be a number"):
        await store.feedback("r1", "success", math.nan)


async def test_request_map_is_bounded(store: FeedbackStore) -> None:
    for i in range(60):
        await store.record_outcome(ok(f"r{i}"))
    await settle()
    assert store.statistics().state["tracked_requests"] == 50
    assert (await store.feedback("r0", "success")).status == "unknown"
    assert (await store.feedback("r59", "success")).status == "applied"


async def test_failed_earlier_attempts_teach_routing_but_take_no_feedback_slot(
    store: FeedbackStore,
) -> None:
    for i in range(50):
        await store.record_outcome(ok(f"r{i}"))
    for i in range(30):  # retries of other requests: they count against BAD ...
        failed = Outcome(f"x{i}#0", BAD.deployment_id, "m", success=False, final=False)
        await store.record_outcome(failed)
    await settle()
    assert store.stats_snapshot()[BAD.deployment_id].samples == 30
    # ... but the 50 served requests are all still open to feedback
    assert store.statistics().state["tracked_requests"] == 50
    assert (await store.feedback("r0", "success")).status == "applied"
    assert (await store.feedback("x0#0", "success")).status == "unknown"


async def test_request_map_evicts_oldest_first_and_reinsert_is_newest(
    store: FeedbackStore,
) -> None:
    for i in range(50):
        await store.record_outcome(ok(f"r{i}"))
    await store.record_outcome(ok("r0"))  # served again: the newest entry now
    await store.record_outcome(ok("r50"))  # full: the oldest (r1) goes
    await settle()
    assert store.statistics().state["tracked_requests"] == 50
    assert (await store.feedback("r1", "success")).status == "unknown"
    for rid in ("r0", "r2", "r49", "r50"):
        assert (await store.feedback(rid, "success")).status == "applied"


async def test_feedback_checks_the_owner_and_rejects_duplicates(store: FeedbackStore) -> None:
    await store.record_outcome(Outcome("r1", GOOD.deployment_id, "m", success=True, owner="k1"))
    await store.record_outcome(Outcome("r2", BAD.deployment_id, "m2", success=True, owner="k2"))
    await settle()
    assert (await store.feedback("r1", "success", owner="k2")).status == "unknown"
    assert (await store.feedback("r1", "success")).status == "unknown"  # no key: not the owner
    res = await store.feedback("r1", "failure", owner="k1")
    assert (res.status, res.deployment_id, res.model) == ("applied", GOOD.deployment_id, "m")
    assert (await store.feedback("r1", "success", owner="k1")).status == "duplicate"
    res = await store.feedback("r2", "success", owner="k2")  # the other entry is untouched
    assert (res.status, res.deployment_id, res.model) == ("applied", BAD.deployment_id, "m2")
    # a request id served again (a client reusing x-request-id) is a new request: new feedback
    await store.record_outcome(Outcome("r1", BAD.deployment_id, "m", success=True, owner="k1"))
    await settle()
    res = await store.feedback("r1", "success", owner="k1")
    assert (res.status, res.deployment_id) == ("applied", BAD.deployment_id)


async def test_request_map_memory_is_fixed(store: FeedbackStore) -> None:
    served = store._served
    before = served._ring.nbytes()
    for i in range(200):  # every request by another key: distinct (deployment, model, owner)
        await store.record_outcome(Outcome(f"r{i}", GOOD.deployment_id, "m", success=True,
                                           owner=f"key{i}"))
    await settle()
    assert len(served) == 50 and served.labels() == 50  # only the live entries' triples kept
    assert (await store.feedback("r199", "success", owner="key199")).status == "applied"
    for i in range(50):
        await store.record_outcome(ok(f"s{i}"))
    await settle()
    assert served.labels() == 1 and served._ring.nbytes() == before
    assert len(served._labels) <= 51  # numbers of dropped triples are reused


async def test_blocked_requests_never_touch_provider_stats(store: FeedbackStore) -> None:
    # a guardrail/policy/budget block is never turned into an Outcome: the provider's stats stay
    # empty and feedback on that request id is unknown (→ 404)
    assert (await store.feedback("blocked-1", "failure")).status == "unknown"
    assert store.stats_snapshot() == {}


async def test_routing_view_shows_learning(store: FeedbackStore) -> None:
    models = {"m": [GOOD, BAD]}
    view = store.routing_view(models, {"m": "outcome_aware"})
    row = view["models"][0]
    assert row["warmup"] and row["strategy"] == "outcome_aware"
    assert [d["score"] for d in row["deployments"]] == [None, None]
    assert [store.route("m", "outcome_aware", [GOOD, BAD]) for _ in range(6)] == [GOOD, BAD] * 3
    for i in range(6):
        await store.record_outcome(ok(f"g{i}"))
        await store.record_outcome(Outcome(f"b{i}", BAD.deployment_id, "m", success=False,
                                           refused=True, cost_usd=0.0))
    await settle()
    row = store.routing_view(models)["models"][0]
    good, bad = row["deployments"]
    assert not row["warmup"] and row["recent_choices"] == 6
    assert good["share"] == 0.5 and good["samples"] == 6 and good["score"] == pytest.approx(0.01)
    assert bad["never_succeeded"] and bad["score"] is None and bad["refusal_rate"] > 0.5
    assert view["settings"]["explore_rate"] == 0.05


async def test_route_raises_without_candidates(store: FeedbackStore) -> None:
    with pytest.raises(NoCandidates):
        store.route("m", "outcome_aware", [])


async def test_closed_loop_converges_and_recovers(
    store: FeedbackStore, autojump_clock: trio.testing.MockClock
) -> None:
    """Through the actor on trio's (autojumping) clock: one request per second."""
    rng = random.Random(4)
    cands = [GOOD, BAD]

    async def serve(n: int, bad_refuses: float) -> list[str]:
        chosen = []
        for i in range(n):
            c = store.route("m", "outcome_aware", cands)
            chosen.append(c.provider)
            refused = c is BAD and rng.random() < bad_refuses
            price = 0.02 if c is GOOD else 0.015
            await store.record_outcome(Outcome(f"{n}-{i}", c.deployment_id, "m",
                                               success=not refused, refused=refused,
                                               cost_usd=price * (0.3 if refused else 1.0)))
            await trio.sleep(1.0)
        return chosen

    first = await serve(400, bad_refuses=0.5)
    assert Counter(first[10:])["good"] / 390 >= 0.85
    second = await serve(600, bad_refuses=0.0)
    assert Counter(second[-200:])["bad"] / 200 >= 0.85
    view = store.routing_view({"m": cands})["models"][0]["deployments"]
    assert view[1]["share"] > view[0]["share"]


async def test_stale_stats_decay_in_view(
    store: FeedbackStore, autojump_clock: trio.testing.MockClock
) -> None:
    for i in range(5):
        await store.record_outcome(Outcome(f"b{i}", BAD.deployment_id, "m", success=i == 0,
                                           refused=i > 0, cost_usd=0.01))
    await settle()
    fresh = store.routing_view({"m": [BAD]})["models"][0]["deployments"][0]
    await trio.sleep(3000)  # ten decay time constants
    stale = store.routing_view({"m": [BAD]})["models"][0]["deployments"][0]
    assert fresh["refusal_rate"] > 0.4 and stale["refusal_rate"] < 0.001
    assert stale["success_rate"] > 0.999 and stale["idle_s"] == pytest.approx(3000, abs=1)
    assert stale["samples"] == 5
