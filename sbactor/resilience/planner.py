"""The retry/fallback state machine, sans I/O: the dispatch loop asks it what to do next.

    plan = AttemptPlanner(config=cfg, model="gpt-4o", fallbacks=table, rng=rng, started_at=now)
    while True:
        step = plan.next_step(now)            # Try | GiveUp | Done
        if not isinstance(step, Try): break
        await trio.sleep(step.delay_s); route step.model (prefer/exclude), run the attempt
        plan.record(deployment_id, step.model, failure_or_None, now, provider=...)

Rules, in the order they are applied after a failure of class C on model M:

1. Retry M while its retries for C are left (counted per model and class) and the backoff
   fits in the deadline; the retry prefers the same deployment (the router moves on if it cools).
2. C picks the fallback list: ``context_window_fallbacks`` for context_window,
   ``content_policy_fallbacks`` for content_policy, none for bad_request (the request itself is
   wrong), ``fallbacks`` for everything else (auth included: the provider that rejected the key is
   excluded for the rest of the request). Lists are searched from the failing model back to the
   requested one. A model is tried at most once as a fallback target and the requested model counts
   as tried, so cycles (A→B→A) are impossible and no model's retry cycle restarts.
3. context_window with no fallback left and ``on_context_window: compress``: one retry of M with
   the oldest turns dropped (``compress_messages``).
4. Otherwise give up with the last failure. Nothing is scheduled past ``request_deadline_s``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import attrs

from sbactor.resilience.backoff import retry_delay
from sbactor.resilience.compress import compress_messages, estimate_tokens, overflow_numbers
from sbactor.resilience.config import ResilienceConfig
from sbactor.resilience.failure import Failure, FailureClass

__all__ = ["Attempt", "AttemptPlanner", "Done", "FallbackEntry", "FallbackTable", "GiveUp",
           "PlannerError", "Step", "Try"]

_MAX_ATTEMPTS = 64  # a hard stop whatever the config says


class PlannerError(RuntimeError):
    """The planner was driven out of order (a bug in the caller)."""


@attrs.frozen
class FallbackEntry:
    fallbacks: tuple[str, ...] = ()
    context_window_fallbacks: tuple[str, ...] = ()
    content_policy_fallbacks: tuple[str, ...] = ()
    context_window: int | None = None

    def list_for(self, cls: FailureClass) -> tuple[str, ...]:
        if cls is FailureClass.CONTEXT_WINDOW:
            return self.context_window_fallbacks
        if cls is FailureClass.CONTENT_POLICY:
            return self.content_policy_fallbacks
        if cls is FailureClass.BAD_REQUEST:
            return ()
        return self.fallbacks


@attrs.frozen
class FallbackTable:
    """Model name → its typed fallback lists (plain tuples of model names)."""

    entries: Mapping[str, FallbackEntry] = attrs.field(factory=dict)

    @classmethod
    def from_models(cls, models: Iterable[Any]) -> FallbackTable:
        """Build from ``ModelConfig``-like objects (name, fallbacks, …, context_window)."""
        return cls({
            m.name: FallbackEntry(
                tuple(getattr(m, "fallbacks", ()) or ()),
                tuple(getattr(m, "context_window_fallbacks", ()) or ()),
                tuple(getattr(m, "content_policy_fallbacks", ()) or ()),
                getattr(m, "context_window", None),
            )
            for m in models
        })

    def entry(self, model: str) -> FallbackEntry:
        return self.entries.get(model, FallbackEntry())


@attrs.frozen
class Attempt:
    """One attempt, as recorded in the usage event and ``x-sbactor-attempts``."""

    model: str
    deployment: str | None
    provider: str | None
    cls: FailureClass | None  # None = success
    status: int | None
    code: str | None
    delay_s: float
    reason: str  # first | retry | fallback | <class>_fallback | compressed
    at_s: float  # when the attempt ended, seconds since the request started
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.cls is None

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "deployment": self.deployment, "provider": self.provider,
                "class": self.cls.value if self.cls else "ok", "status": self.status,
                "code": self.code, "delay_s": round(self.delay_s, 3), "reason": self.reason,
                "at_s": round(self.at_s, 3), "message": self.message}


@attrs.frozen
class Try:
    """Run an attempt on ``model`` after ``delay_s``; finish it within ``timeout_s``.

    The router should use ``prefer_deployment`` unless it is cooling down, never a deployment in
    ``exclude_deployments`` or on a provider in ``exclude_providers``. ``messages``, when set,
    replace the request's messages (context compression happened)."""

    model: str
    delay_s: float
    timeout_s: float
    reason: str
    prefer_deployment: str | None = None
    exclude_deployments: frozenset[str] = frozenset()
    exclude_providers: frozenset[str] = frozenset()
    messages: tuple[Mapping[str, Any], ...] | None = None


@attrs.frozen
class GiveUp:
    """Stop: answer with ``failure`` (see ``report.give_up_error``). ``usable_attempt`` is the index
    of an attempt whose 2xx answer (a refusal or content-filtered reply) may be served as is."""

    failure: Failure
    reason: str
    usable_attempt: int | None = None


@attrs.frozen
class Done:
    """The last attempt succeeded."""

    attempt: Attempt


Step = Try | GiveUp | Done


@attrs.define(eq=False)
class AttemptPlanner:
    config: ResilienceConfig
    model: str
    fallbacks: FallbackTable
    rng: random.Random
    started_at: float
    messages: Sequence[Mapping[str, Any]] | None = None
    reserve_output_tokens: int = 0
    estimate: Callable[[Sequence[Mapping[str, Any]]], int] = estimate_tokens
    _attempts: list[Attempt] = attrs.field(factory=list, init=False)
    _pending: Try | None = attrs.field(default=None, init=False)
    _final: GiveUp | Done | None = attrs.field(default=None, init=False)
    _last_failure: Failure | None = attrs.field(default=None, init=False)
    _tried: list[str] = attrs.field(factory=list, init=False)
    _came_from: dict[str, str] = attrs.field(factory=dict, init=False)
    _retries: dict[tuple[str, FailureClass], int] = attrs.field(factory=dict, init=False)
    _exclude_deps: set[str] = attrs.field(factory=set, init=False)
    _exclude_providers: set[str] = attrs.field(factory=set, init=False)
    _compressed: tuple[Mapping[str, Any], ...] | None = attrs.field(default=None, init=False)
    _dropped: int = attrs.field(default=0, init=False)
    _usable: int | None = attrs.field(default=None, init=False)
    _last_upstream: Failure | None = attrs.field(default=None, init=False)  # from a real call

    @property
    def deadline(self) -> float:
        return self.started_at + self.config.request_deadline_s

    @property
    def attempts(self) -> tuple[Attempt, ...]:
        return tuple(self._attempts)

    @property
    def tags(self) -> tuple[str, ...]:
        """Event tags: ``context_compressed`` when a compressed retry was scheduled."""
        return ("context_compressed",) if self._compressed is not None else ()

    @property
    def compression(self) -> dict[str, int] | None:
        if self._compressed is None:
            return None
        return {"dropped_messages": self._dropped, "kept_messages": len(self._compressed)}

    def remaining_s(self, now: float) -> float:
        return max(0.0, self.deadline - now)

    # -- driving ---------------------------------------------------------------------------------

    def next_step(self, now: float) -> Step:
        if self._pending is not None:
            raise PlannerError("record() the attempt of the previous Try before asking again")
        if self._final is not None:
            return self._final
        if not self._attempts:
            if self.remaining_s(now) <= 0:
                return self._finish(GiveUp(Failure(FailureClass.TIMEOUT, None,
                                                   "request deadline passed before any attempt"),
                                           "deadline"))
            self._tried.append(self.model)
            return self._schedule(Try(self.model, 0.0, self.remaining_s(now), "first",
                                      messages=None))
        last = self._attempts[-1]
        if last.cls is None:
            return self._finish(Done(last))
        assert self._last_failure is not None
        return self._after_failure(last, self._last_failure, now)

    def record(self, deployment: str | None, model: str, failure: Failure | None, now: float,
               *, provider: str | None = None) -> Attempt:
        """Record the outcome of the pending ``Try`` (``failure`` None = success)."""
        if self._pending is None:
            raise PlannerError("record() without a pending Try")
        step, self._pending = self._pending, None
        attempt = Attempt(
            model=model, deployment=deployment, provider=provider,
            cls=failure.cls if failure else None,
            status=failure.status if failure else 200,
            code=failure.code if failure else None,
            delay_s=step.delay_s, reason=step.reason, at_s=max(0.0, now - self.started_at),
            message=failure.message if failure else "",
        )
        self._attempts.append(attempt)
        self._last_failure = failure
        if failure is not None and deployment is not None:
            self._last_upstream = failure
        if failure is not None:
            if failure.cls is FailureClass.CONTENT_POLICY and failure.status is not None and (
                200 <= failure.status < 300
            ):
                self._usable = len(self._attempts) - 1
            if failure.cls in (FailureClass.AUTH, FailureClass.NOT_FOUND) and deployment:
                self._exclude_deps.add(deployment)
            if failure.cls is FailureClass.AUTH and provider:
                self._exclude_providers.add(provider)
        return attempt

    def record_unroutable(self, model: str, now: float, detail: str = "") -> Attempt:
        """The router found no usable deployment for the pending ``Try`` (all cooling/excluded):
        counts as a server_error on ``model`` that is not retried; fallbacks still apply."""
        message = f"no deployment of model {model!r} is available"
        failure = Failure(FailureClass.SERVER_ERROR, None,
                          f"{message} ({detail})" if detail else message, "no_deployment")
        key = (model, FailureClass.SERVER_ERROR)
        self._retries[key] = max(self._retries.get(key, 0),
                                 self.config.retry_policy.server_error)
        return self.record(None, model, failure, now)

    # -- decisions -------------------------------------------------------------------------------

    def _schedule(self, step: Try) -> Try:
        self._pending = step
        return step

    def _finish(self, final: GiveUp | Done) -> GiveUp | Done:
        self._final = final
        return final

    def _give_up(self, failure: Failure, reason: str) -> GiveUp:
        result = self._finish(GiveUp(failure, reason, self._usable))
        assert isinstance(result, GiveUp)
        return result

    def _after_failure(self, last: Attempt, failure: Failure, now: float) -> Step:
        cls = failure.cls
        model = last.model
        remaining = self.remaining_s(now)
        if not self.config.enabled:
            return self._give_up(failure, "resilience is disabled: one attempt only")
        if remaining <= 0:
            deadline = self.config.request_deadline_s
            return self._give_up(failure, f"request deadline of {deadline:g}s reached after "
                                          f"{len(self._attempts)} attempts")
        if len(self._attempts) >= _MAX_ATTEMPTS:
            return self._give_up(failure, f"attempt limit of {_MAX_ATTEMPTS} reached")
        if cls is FailureClass.CONTEXT_WINDOW and self.config.on_context_window == "fail":
            return self._give_up(failure, "context window exceeded (on_context_window: fail)")

        retry = self._retry(last, failure, now)
        if retry is not None:
            return self._schedule(retry)
        target = self._next_fallback(model, cls)
        if target is not None:
            self._tried.append(target)
            self._came_from[target] = model
            kind = {FailureClass.CONTEXT_WINDOW: "context_window_fallback",
                    FailureClass.CONTENT_POLICY: "content_policy_fallback"}.get(cls, "fallback")
            return self._schedule(self._try(target, 0.0, now, kind, prefer=None))
        if cls is FailureClass.CONTEXT_WINDOW and self.config.on_context_window == "compress":
            step = self._compress(model, failure, now)
            if step is not None:
                return self._schedule(step)
            return self._give_up(failure, "context window exceeded and the conversation cannot "
                                          "be compressed to fit")
        if failure.code == "no_deployment" and last.deployment is None:
            # a fallback had nowhere to go: report the upstream failure that led here, if any
            why = f"{failure.message}; no fallback left for model {model!r}"
            return self._give_up(self._last_upstream or failure, why)
        return self._give_up(failure, self._why_no_more(model, cls))

    def _retry(self, last: Attempt, failure: Failure, now: float) -> Try | None:
        if last.deployment is None and failure.code == "no_deployment":
            return None
        key = (last.model, failure.cls)
        used = self._retries.get(key, 0)
        if used >= self.config.retry_policy.retries_for(failure.cls):
            return None
        delay = retry_delay(
            used + 1, base_s=self.config.backoff_base_s, max_s=self.config.backoff_max_s,
            rng=self.rng, remaining_s=self.remaining_s(now), retry_after_s=failure.retry_after_s,
            max_retry_after_s=self.config.max_retry_after_s,
        )
        if delay.clipped:
            return None  # waiting would pass the deadline: move on to a fallback instead
        self._retries[key] = used + 1
        prefer = last.deployment if last.deployment not in self._exclude_deps else None
        return self._try(last.model, delay.delay_s, now, "retry", prefer=prefer)

    def _try(self, model: str, delay_s: float, now: float, reason: str,
             prefer: str | None) -> Try:
        return Try(model, delay_s, max(0.0, self.remaining_s(now) - delay_s), reason, prefer,
                   frozenset(self._exclude_deps), frozenset(self._exclude_providers),
                   self._compressed)

    def _next_fallback(self, model: str, cls: FailureClass) -> str | None:
        """First untried name in the class's list of the failing model, then of the model it fell
        back from, up to the requested model."""
        current: str | None = model
        seen: set[str] = set()
        while current is not None and current not in seen:
            seen.add(current)
            for name in self.fallbacks.entry(current).list_for(cls):
                if name not in self._tried:
                    return name
            current = self._came_from.get(current)
        return None

    def _compress(self, model: str, failure: Failure, now: float) -> Try | None:
        if self._compressed is not None or not self.messages:
            return None
        numbers = overflow_numbers(failure.message)
        window = self.fallbacks.entry(model).context_window
        if numbers is not None:
            window = numbers[1] if window is None else min(window, numbers[1])
        if window is None:
            return None
        estimate = self.estimate
        min_drop = 1
        if numbers is not None:
            ours = max(1, estimate(self.messages))
            scale = max(1.0, numbers[0] / ours)  # calibrate our estimate on the upstream's count
            base = estimate

            def estimate(msgs: Sequence[Mapping[str, Any]]) -> int:
                return math.ceil(base(msgs) * scale)
        budget = window - self.reserve_output_tokens
        compressed = compress_messages(self.messages, budget, estimate, min_drop=min_drop)
        if compressed is None:
            return None
        self._compressed = tuple(compressed)
        self._dropped = len(self.messages) - len(compressed)
        return self._try(model, 0.0, now, "compressed", prefer=None)

    def _why_no_more(self, model: str, cls: FailureClass) -> str:
        retries = self.config.retry_policy.retries_for(cls)
        used = self._retries.get((model, cls), 0)
        if cls is FailureClass.BAD_REQUEST:
            what = "the upstream rejected the request as invalid (not retried, no fallback)"
        elif retries == 0:
            what = f"{cls.value} is not retried"
        elif used < retries:
            what = f"{cls.value}: the next retry would pass the request deadline"
        else:
            what = f"{cls.value}: retries exhausted ({used} of {retries})"
        return f"{what}; no fallback left for model {model!r}"
