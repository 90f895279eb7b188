"""FeedbackStore: the actor that owns per-deployment outcome statistics.

Writes (end-of-request outcomes, verified client feedback) go through the mailbox, so the stats
have exactly one writer. Reads do not: the actor replaces an immutable map on every update, and
``stats_snapshot``/``route`` read it synchronously — routing costs no round trip per request
(safe because trio runs every task on one thread).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, Literal

import attrs
import trio

from sbactor.actors.runtime import Actor
from sbactor.bounded import KeyRing, compact_key
from sbactor.routing.config import RoutingSettings
from sbactor.routing.share import ShareWindow
from sbactor.routing.stats import (
    EMPTY_STATS,
    DeploymentStats,
    Outcome,
    apply_feedback,
    decay,
    score,
    update_stats,
)
from sbactor.routing.strategies import Candidate, Router, in_warmup

FeedbackStatus = Literal["applied", "unknown", "duplicate"]


@attrs.frozen
class FeedbackResult:
    """``unknown`` → the endpoint answers 404; ``duplicate`` → ignored; ``applied`` → folded in
    (and worth a ledger event: deployment and model say whose stats moved)."""

    status: FeedbackStatus
    request_id: str
    deployment_id: str | None = None
    model: str | None = None
    outcome: str | None = None
    score: float | None = None


@attrs.frozen
class _Feedback:
    request_id: str
    outcome: str
    score: float | None
    owner: str = ""


@attrs.frozen
class _Served:
    """What the store remembers about one served request (a view: see ``_ServedMap``)."""

    deployment_id: str
    model: str
    feedback_done: bool = False
    owner: str = ""


# One entry of the served map: 4 bytes = which (deployment, model, owner), 1 byte = feedback done.
_LABEL_BYTES = 4
_DONE = _LABEL_BYTES


class _ServedMap:
    """``request_id → _Served`` for the last ``capacity`` outcomes, in fixed memory.

    Each entry is 21 bytes in a preallocated ``KeyRing`` (the request id as 16 bytes, see
    ``compact_key``; a 4-byte number naming its ``(deployment_id, model, owner)``; a feedback-done
    flag) plus 4-byte index slots: ~31 bytes, against ~230 for an ``OrderedDict`` of
    ``_Served``. The distinct ``(deployment_id, model, owner)`` triples are kept once, with a
    count of the entries naming them, and dropped when the last such entry goes.
    """

    __slots__ = ("_free", "_ids", "_labels", "_refs", "_ring")

    def __init__(self, capacity: int) -> None:
        self._ring = KeyRing(capacity, value_size=_LABEL_BYTES + 1)
        self._labels: list[tuple[str, str, str] | None] = []
        self._refs: list[int] = []
        self._ids: dict[tuple[str, str, str], int] = {}
        self._free: list[int] = []

    def __len__(self) -> int:
        return len(self._ring)

    def labels(self) -> int:
        """How many distinct (deployment_id, model, owner) triples the entries name."""
        return len(self._ids)

    def get(self, request_id: str) -> _Served | None:
        slot = self._ring.find(compact_key(request_id))
        if slot < 0:
            return None
        value = self._ring.value(slot)
        label = self._labels[int.from_bytes(value[:_LABEL_BYTES], "little")]
        assert label is not None
        return _Served(label[0], label[1], feedback_done=bool(value[_DONE]), owner=label[2])

    def put(self, request_id: str, deployment_id: str, model: str, owner: str) -> None:
        """Remember a served request as the newest entry (replacing one with the same id)."""
        key = compact_key(request_id)
        slot = self._ring.find(key)
        if slot >= 0:
            self._release(self._ring.value(slot))
            self._ring.remove(slot)
        label = (deployment_id, model, owner)
        number = self._ids.get(label)
        if number is None:
            if self._free:
                number = self._free.pop()
                self._labels[number] = label
                self._refs[number] = 0
            else:
                number = len(self._labels)
                self._labels.append(label)
                self._refs.append(0)
            self._ids[label] = number
        self._refs[number] += 1
        evicted = self._ring.insert(key, number.to_bytes(_LABEL_BYTES, "little") + b"\0")
        if evicted is not None:
            self._release(evicted)

    def mark_done(self, request_id: str) -> None:
        slot = self._ring.find(compact_key(request_id))
        if slot >= 0:
            value = self._ring.value(slot)
            self._ring.set_value(slot, value[:_DONE] + b"\1")

    def _release(self, value: bytes) -> None:
        number = int.from_bytes(value[:_LABEL_BYTES], "little")
        self._refs[number] -= 1
        if self._refs[number] == 0:
            label = self._labels[number]
            assert label is not None
            del self._ids[label]
            self._labels[number] = None
            self._free.append(number)


def _check_feedback(outcome: str, score: float | None) -> float:
    """Validate a ``POST /v1/feedback`` body's fields; return the observation in [0, 1]."""
    if outcome not in ("success", "failure"):
        raise ValueError(f"outcome must be 'success' or 'failure', got {outcome!r}")
    if score is None:
        return 1.0 if outcome == "success" else 0.0
    if isinstance(score, bool) or not isinstance(score, int | float) or not math.isfinite(score):
        raise ValueError("score must be a number between 0 and 1")
    if not 0.0 <= score <= 1.0:
        raise ValueError(f"score must be between 0 and 1, got {score}")
    return float(score)


@attrs.define(eq=False)
class FeedbackStore(Actor):
    """Owns ``deployment_id → DeploymentStats`` and a bounded ``request_id → deployment`` map."""

    name: str = "feedback_store"
    settings: RoutingSettings = attrs.field(factory=RoutingSettings)
    clock: Callable[[], float] = trio.current_time
    rng: random.Random = attrs.field(factory=random.Random)
    call_timeout_s: float = 5.0

    _stats: Mapping[str, DeploymentStats] = attrs.field(
        init=False, factory=lambda: MappingProxyType({})
    )
    _served: _ServedMap = attrs.field(init=False)
    _shares: ShareWindow = attrs.field(init=False)
    _router: Router = attrs.field(init=False)
    _outcomes: int = attrs.field(init=False, default=0)
    _feedback_counts: dict[str, int] = attrs.field(
        init=False, factory=lambda: {"applied": 0, "unknown": 0, "duplicate": 0}
    )

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self._shares = ShareWindow(self.settings.share_window)
        self._served = _ServedMap(self.settings.feedback_capacity)
        self._router = Router(self.settings, self.rng)

    # ---- client API ------------------------------------------------------------------------

    async def record_outcome(self, outcome: Outcome) -> None:
        """Queue one end-of-request outcome (waits for mailbox room)."""
        await self.cast(outcome)

    def record_outcome_nowait(self, outcome: Outcome) -> None:
        """Queue one outcome; raises ``trio.WouldBlock`` when the mailbox is full."""
        self.cast_nowait(outcome)

    async def feedback(
        self, request_id: str, outcome: str, score: float | None = None, *, owner: str = ""
    ) -> FeedbackResult:
        """Fold a client-verified outcome into the success rate of the deployment that served
        ``request_id``. Raises ``ValueError`` (→ 400) for a bad outcome/score; waits at most
        ``call_timeout_s`` (``ActorCallTimeout``)."""
        _check_feedback(outcome, score)
        result: FeedbackResult = await self.call(
            _Feedback(request_id, outcome, score, owner), timeout=self.call_timeout_s
        )
        return result

    def stats_snapshot(self) -> Mapping[str, DeploymentStats]:
        """The current immutable stats map (sync; replaced wholesale on each update)."""
        return self._stats

    def note_choice(self, model: str, deployment_id: str) -> None:
        """Count a routing choice toward the model's share-of-traffic window."""
        self._shares.note(model, deployment_id)

    def route(
        self, model: str, strategy: str, candidates: Sequence[Candidate], *, note: bool = True
    ) -> Candidate:
        """Choose a deployment with the current stats (sync, no round trip); ``note`` counts the
        choice toward the share of traffic (the gateway notes attempts instead, so a request
        the policy blocks after routing is no traffic).

        Raises ``NoCandidates`` when ``candidates`` is empty."""
        chosen = self._router.pick(model, strategy, candidates, self._stats, self.clock())
        if note:
            self.note_choice(model, chosen.deployment_id)
        return chosen

    def routing_view(
        self,
        models: Mapping[str, Sequence[Candidate]],
        strategies: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        """The body of ``GET /admin/routing``: per model, each deployment's EWMAs, samples,
        score (``null`` when unknown or infinite) and share of recent traffic."""
        now = self.clock()
        settings = self.settings
        out: list[dict[str, Any]] = []
        for model, candidates in models.items():
            shares = self._shares.shares(model)
            rows = []
            for c in candidates:
                raw = self._stats.get(c.deployment_id, EMPTY_STATS)
                view = decay(raw, now, settings.decay_s)
                value = score(view, settings.latency_weight)
                rows.append({
                    "deployment_id": c.deployment_id,
                    "provider": c.provider,
                    "model": c.model,
                    "price": {"input_per_mtok": c.input_per_mtok,
                              "output_per_mtok": c.output_per_mtok},
                    "samples": raw.samples,
                    "successes": raw.successes,
                    "refusals": raw.refusals,
                    "feedback": raw.feedback,
                    "ewma_cost_usd": view.ewma_cost,
                    "success_rate": round(view.ewma_success, 6),
                    "refusal_rate": round(view.ewma_refusal, 6),
                    "latency_s": view.ewma_latency,
                    "score": None if raw.samples == 0 or math.isinf(value) else value,
                    "never_succeeded": raw.never_succeeded,
                    "share": round(shares.get(c.deployment_id, 0.0), 4),
                    "idle_s": None if raw.last_update is None else round(now - raw.last_update, 3),
                })
            out.append({
                "model": model,
                "strategy": (strategies or {}).get(model),
                "warmup": in_warmup(candidates, self._stats, settings),
                "recent_choices": self._shares.total(model),
                "deployments": rows,
            })
        return {"settings": attrs.asdict(settings), "models": out}

    # ---- the actor side ----------------------------------------------------------------------

    async def handle(self, message: Any) -> Any:
        if isinstance(message, Outcome):
            self._record(message)
            return None
        if isinstance(message, _Feedback):
            return self._apply(message)
        raise TypeError(f"FeedbackStore cannot handle {type(message).__name__}")

    def _record(self, o: Outcome) -> None:
        now = self.clock()
        s = self.settings
        current = decay(self._stats.get(o.deployment_id, EMPTY_STATS), now, s.decay_s)
        self._replace(o.deployment_id, update_stats(current, o, s.alpha, now))
        self._outcomes += 1
        if o.final:  # failed earlier attempts never take a slot of the feedback window
            self._served.put(o.request_id, o.deployment_id, o.model, o.owner)

    def _apply(self, f: _Feedback) -> FeedbackResult:
        served = self._served.get(f.request_id)
        if served is not None and served.owner != f.owner:
            served = None  # another key's request: answered as unknown, its existence not leaked
        if served is None:
            self._feedback_counts["unknown"] += 1
            return FeedbackResult("unknown", f.request_id)
        base = FeedbackResult("duplicate", f.request_id, served.deployment_id, served.model,
                              f.outcome, f.score)
        if served.feedback_done:
            self._feedback_counts["duplicate"] += 1
            return base
        self._served.mark_done(f.request_id)
        now = self.clock()
        s = self.settings
        current = decay(self._stats.get(served.deployment_id, EMPTY_STATS), now, s.decay_s)
        value = _check_feedback(f.outcome, f.score)
        self._replace(served.deployment_id, apply_feedback(current, value, s.alpha, now))
        self._feedback_counts["applied"] += 1
        return attrs.evolve(base, status="applied")

    def _replace(self, deployment_id: str, stats: DeploymentStats) -> None:
        updated = dict(self._stats)
        updated[deployment_id] = stats
        self._stats = MappingProxyType(updated)

    def state_summary(self) -> dict[str, Any]:
        return {
            "deployments": len(self._stats),
            "outcomes": self._outcomes,
            "tracked_requests": len(self._served),
            "feedback": dict(self._feedback_counts),
        }
