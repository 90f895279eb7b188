"""BudgetTracker: the actor that owns every budget counter and rate-limit window.

The gateway ``call``s ``preflight`` before dispatch (rate limits, hard caps, reservation, soft
landing in one atomic step — atomic because only this task touches the book) and ``cast``s
``reconcile`` after the call, also on failure and cancellation, so a reservation never leaks
(and a reservation whose reconcile got lost anyway is released after ``reservation_ttl_s``).
Counters are snapshotted to a JSON file (temp + fsync + rename) periodically and on stop.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import attrs
import trio

from sbactor.actors.runtime import Actor, ActorClosed, NotInline, Supervision
from sbactor.budget.book import BudgetBook, Decision, Refused
from sbactor.budget.config import BudgetConfig, BudgetSettings, RateLimitConfig
from sbactor.budget.ratelimit import RateLimiter, RateRefused
from sbactor.budget.scopes import RequestScopes
from sbactor.budget.windows import iso

log = logging.getLogger("sbactor.budget")

# (model, input_tokens, max_output_tokens) -> worst-case USD at that model's price, or None.
CostEstimator = Callable[[str, int, int], float | None]


@attrs.frozen
class PreflightRequest:
    request_id: str
    scopes: RequestScopes
    model: str
    input_tokens: int
    max_output_tokens: int
    cost_estimate_usd: float


@attrs.frozen
class PreflightResult:
    ok: bool
    # "unavailable": shared state (redis) down with on_unavailable fail_closed → 503
    kind: Literal["rate_limit", "budget", "unavailable"] | None = None
    scope: str | None = None  # which limit/budget refused, e.g. "team/day [team=research]"
    message: str | None = None
    retry_after_s: float | None = None  # None: this request can never fit
    resets_at: str | None = None  # ISO-8601 UTC; None: never resets
    fraction: float = 0.0
    forecast_fraction: float = 0.0
    warn: bool = False
    warning: str | None = None
    downgrade: bool = False
    downgrade_to: str | None = None  # None with downgrade: pick the cheapest same-surface model
    budget_exceeded: bool = False
    reserved_usd: float = 0.0
    degraded: bool = False  # decided on local counters: shared state unavailable (fail_open)

    @classmethod
    def admitted(cls, decision: Decision, reserved_usd: float) -> PreflightResult:
        """The request fits: reserved, with the soft-landing decision for its scopes."""
        return cls(
            ok=True,
            fraction=decision.fraction,
            forecast_fraction=decision.forecast_fraction,
            warn=decision.warn,
            warning=decision.message,
            downgrade=decision.downgrade,
            downgrade_to=decision.downgrade_to,
            reserved_usd=reserved_usd,
        )

    def headers(self) -> dict[str, str]:
        """Response headers: ``Retry-After`` on refusals, the budget warning when near a cap."""
        out: dict[str, str] = {}
        if not self.ok and self.retry_after_s is not None:
            out["Retry-After"] = str(max(math.ceil(self.retry_after_s), 1))
        if self.warn and self.warning:
            out["x-sbactor-budget-warning"] = self.warning
        return out

    def error_body(self) -> dict[str, Any]:
        """OpenAI-shaped 429 body for a refusal."""
        kind = "budget_exceeded" if self.kind == "budget" else "rate_limit_exceeded"
        return {
            "error": {
                "message": self.message,
                "type": kind,
                "code": kind,
                "scope": self.scope,
                "resets_at": self.resets_at,
                "retry_after_s": self.retry_after_s,
            }
        }

    def policy_view(self) -> dict[str, Any]:
        """The ``ai.budget.*`` activation for the CEL policy plane."""
        return {
            "fraction": self.fraction,
            "forecast_fraction": self.forecast_fraction,
            "exceeded": self.budget_exceeded,
            "warn": self.warn,
            "downgrade": self.downgrade,
            "downgrade_to": self.downgrade_to or "",
        }


@attrs.frozen
class Reconcile:
    request_id: str
    actual_cost_usd: float
    actual_tokens: int
    scopes: RequestScopes | None = None


@attrs.frozen
class AdminSnapshot:
    pass


@attrs.frozen
class _Tick:
    pass


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@attrs.define(eq=False)
class BudgetTracker(Actor):
    budgets: Sequence[BudgetConfig] = ()
    rate_limits: Sequence[RateLimitConfig] = ()
    settings: BudgetSettings = attrs.field(factory=BudgetSettings)
    snapshot_file: Path | None = None
    # Epoch seconds; None maps trio.current_time() onto wall time at start (autojump-friendly).
    clock: Callable[[], float] | None = None
    estimator: CostEstimator | None = None
    reconcile_timeout_s: float = 5.0

    _book: BudgetBook = attrs.field(init=False)
    _limiter: RateLimiter = attrs.field(init=False)
    _dirty: bool = attrs.field(init=False, default=False)
    _last_saved: float | None = attrs.field(init=False, default=None)
    _save_errors: int = attrs.field(init=False, default=0)
    _warned: dict[str, float] = attrs.field(init=False, factory=dict)
    _downgrades: int = attrs.field(init=False, default=0)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self._book = BudgetBook(self.budgets, self.settings)
        self._limiter = RateLimiter(self.rate_limits)

    @classmethod
    def from_config(
        cls,
        budgets: Sequence[BudgetConfig],
        rate_limits: Sequence[RateLimitConfig],
        settings: BudgetSettings,
        data_dir: str | os.PathLike[str],
        *,
        capacity: int = 4096,
        estimator: CostEstimator | None = None,
    ) -> BudgetTracker:
        path = None
        if settings.snapshot_path:
            path = Path(data_dir) / settings.snapshot_path  # absolute paths stay absolute
        return cls(
            name="budget",
            capacity=capacity,
            supervision=Supervision.RESTART,
            budgets=budgets,
            rate_limits=rate_limits,
            settings=settings,
            snapshot_file=path,
            estimator=estimator,
        )

    # ---- client API --------------------------------------------------------------------

    async def preflight(
        self, request: PreflightRequest, *, timeout_s: float = 5.0
    ) -> PreflightResult:
        result: PreflightResult = await self.call(request, timeout=timeout_s)
        return result

    async def reconcile(
        self,
        request_id: str,
        actual_cost_usd: float,
        actual_tokens: int,
        scopes: RequestScopes | None = None,
    ) -> None:
        """Settle a request (0 cost on failure/cancel). Shielded: safe in ``finally`` blocks of
        cancelled tasks; never raises. Idempotent; unknown ids are a no-op."""
        message = Reconcile(request_id, actual_cost_usd, actual_tokens, scopes)
        with trio.move_on_after(self.reconcile_timeout_s, shield=True) as scope:
            try:
                await self.post(message)
            except ActorClosed:
                return
        if scope.cancelled_caught:
            log.warning("budget reconcile of %s timed out; the TTL will release it", request_id)

    def reconcile_nowait(
        self,
        request_id: str,
        actual_cost_usd: float,
        actual_tokens: int,
        scopes: RequestScopes | None = None,
    ) -> None:
        """Like ``reconcile`` but raises ``trio.WouldBlock`` when the mailbox is full."""
        self.cast_nowait(Reconcile(request_id, actual_cost_usd, actual_tokens, scopes))

    async def admin_snapshot(self, *, timeout_s: float = 5.0) -> list[dict[str, Any]]:
        """Rows for ``GET /admin/budgets``."""
        rows: list[dict[str, Any]] = await self.call(AdminSnapshot(), timeout=timeout_s)
        return rows

    # ---- the actor ---------------------------------------------------------------------

    def _now(self) -> float:
        assert self.clock is not None
        return self.clock()

    async def run(self, *, task_status: trio.TaskStatus[Actor] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._ticker)
            await super().run(task_status=task_status)
            nursery.cancel_scope.cancel()

    async def _ticker(self) -> None:
        interval = min(self.settings.snapshot_interval_s, self.settings.reservation_ttl_s / 4)
        while True:
            await trio.sleep(interval)
            try:
                self.cast_nowait(_Tick())
            except trio.WouldBlock:
                continue
            except ActorClosed:
                return

    async def on_start(self) -> None:
        if self.clock is None:
            offset = time.time() - trio.current_time()
            self.clock = lambda: trio.current_time() + offset
        await self._load()

    async def on_stop(self) -> None:
        await self._save(force=True)

    async def on_restart(self) -> None:
        """A handler bug must not wipe spend: keep the book (it is only mutated by complete
        operations), just note the restart."""
        log.warning("budget tracker restarted after an error: %s", self.statistics().last_error)

    def handle_now(self, message: Any) -> Any:
        # pure book arithmetic, no await: safe to run in the caller when the tracker is idle
        if type(message) is PreflightRequest:
            return self._preflight(message)
        if type(message) is Reconcile:
            return self._reconcile(message)
        raise NotInline

    async def handle(self, message: Any) -> Any:
        if isinstance(message, PreflightRequest):
            return self._preflight(message)
        if isinstance(message, Reconcile):
            return self._reconcile(message)
        if isinstance(message, AdminSnapshot):
            return self._book.admin(self._now())
        if isinstance(message, _Tick):
            expired = self._book.expire(self._now())
            if expired:
                log.warning("released %d budget reservations never reconciled", len(expired))
                self._dirty = True
            await self._save(force=False)
            return None
        raise TypeError(f"budget tracker: unexpected message {message!r}")

    def _reconcile(self, message: Reconcile) -> None:
        now = self._now()
        if self._book.reconcile(
            message.request_id,
            message.actual_cost_usd,
            message.actual_tokens,
            now,
            message.scopes,
        ):
            self._dirty = True
        self._limiter.adjust(message.request_id, message.actual_tokens, now)

    def _preflight(self, req: PreflightRequest) -> PreflightResult:
        now = self._now()
        tokens = req.input_tokens + req.max_output_tokens
        limited = self._limiter.check(req.scopes, tokens, now)
        if limited is not None:
            return _rate_refusal(limited, now)
        decision = self._book.soft_landing(req.scopes, now)
        cost = req.cost_estimate_usd
        if decision.downgrade and decision.downgrade_to and self.estimator is not None:
            cheaper = self.estimator(decision.downgrade_to, req.input_tokens, req.max_output_tokens)
            if cheaper is not None:
                cost = cheaper
        held = self._book.reserve(req.request_id, req.scopes, cost, tokens, now)
        if isinstance(held, Refused):
            return PreflightResult(
                ok=False,
                kind="budget",
                scope=held.description,
                message=held.message,
                retry_after_s=held.retry_after_s,
                resets_at=held.resets_at_iso,
                fraction=decision.fraction,
                forecast_fraction=decision.forecast_fraction,
                budget_exceeded=True,
            )
        self._limiter.commit(req.request_id, req.scopes, tokens, now)
        self._dirty = True
        self._note_warning(decision, now)
        return PreflightResult.admitted(decision, cost)

    def _note_warning(self, decision: Decision, now: float) -> None:
        if decision.downgrade:
            self._downgrades += 1
        if not decision.warn or decision.budget is None:
            return
        last = self._warned.get(decision.budget)
        if last is None or now - last >= 60.0:  # one log line per budget per minute
            self._warned[decision.budget] = now
            log.warning("%s", decision.message)

    # ---- persistence -------------------------------------------------------------------

    async def _load(self) -> None:
        path = self.snapshot_file
        if path is None or not path.exists():
            return
        try:
            data = json.loads(await trio.to_thread.run_sync(path.read_bytes))
            loaded = self._book.restore(data, self._now())
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.error("budget snapshot %s unreadable (%s); starting with empty counters", path, exc)
            return
        log.info("budget counters restored from %s (%d counters)", path, loaded)
        self._last_saved = self._now()

    async def _save(self, *, force: bool) -> None:
        path = self.snapshot_file
        if path is None or not (self._dirty or force):
            return
        now = self._now()
        if not force and self._last_saved is not None:
            if now - self._last_saved < self.settings.snapshot_interval_s * 0.9:
                return
        data = json.dumps({"saved_at": now, **self._book.snapshot()}).encode()
        try:
            await trio.to_thread.run_sync(_write_atomic, path, data, abandon_on_cancel=False)
        except OSError as exc:
            self._save_errors += 1
            log.error("cannot write budget snapshot %s: %s", path, exc)
            return
        self._dirty = False
        self._last_saved = now

    def state_summary(self) -> dict[str, Any]:
        book = attrs.asdict(self._book.statistics())
        rate = attrs.asdict(self._limiter.statistics())
        return {
            **book,
            "rate_limits": rate,
            "downgrades": self._downgrades,
            "snapshot_file": None if self.snapshot_file is None else str(self.snapshot_file),
            "last_saved": iso(self._last_saved),
            "save_errors": self._save_errors,
        }


def _rate_refusal(refused: RateRefused, now: float) -> PreflightResult:
    return PreflightResult(
        ok=False,
        kind="rate_limit",
        scope=refused.description,
        message=refused.message,
        retry_after_s=refused.retry_after_s,
        resets_at=iso(now + refused.retry_after_s),
    )
