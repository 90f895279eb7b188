"""BudgetBook: all budget counters, reservations and the soft-landing decision (pure, sync).

Every operation takes ``now`` (epoch seconds) so the book is deterministic in tests. Pre-flight
``reserve`` is all-or-nothing across the request's counters: a request either holds its
worst-case cost in every counter or in none. ``reconcile`` swaps the reservation for the actual
spend. Because admission checks ``spent + reserved + cost <= cap``, concurrent requests cannot
overshoot a cap as long as each actual cost stays within its reservation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs

from sbactor.bounded import RecentKeys, compact_key
from sbactor.budget.config import BudgetConfig, BudgetSettings
from sbactor.budget.counter import Counter
from sbactor.budget.scopes import CounterId, RequestScopes, counters_for, unique_labels
from sbactor.budget.windows import iso

SNAPSHOT_VERSION = 1
_RECENT_RECONCILED = 10_000
_EPS = 1e-9  # float sums (0.6 + 0.3) must still reach a 0.9 threshold


@attrs.frozen
class Reserved:
    request_id: str
    cost_usd: float
    tokens: int
    counters: tuple[CounterId, ...]


@attrs.frozen
class Refused:
    """A hard cap would be exceeded; nothing was reserved."""

    budget: str
    scope: str
    value: str
    dimension: str  # "cost" | "tokens"
    cap: float
    used: float  # spent + reserved in that dimension
    resets_at: float | None  # epoch s; None: never (total window)
    retry_after_s: float | None  # None: this request can never fit

    @property
    def description(self) -> str:
        return CounterId(self.budget, self.value).describe(self.scope)

    @property
    def resets_at_iso(self) -> str | None:
        return iso(self.resets_at)

    @property
    def message(self) -> str:
        unit = "USD" if self.dimension == "cost" else "tokens"
        when = f"resets at {self.resets_at_iso}" if self.resets_at_iso else "never resets"
        return (
            f"budget exceeded: {self.description} has used {self.used:.6g} of {self.cap:.6g} "
            f"{unit} and this request could need more; the window {when}"
        )


@attrs.frozen
class Decision:
    """What soft landing says about a request, from the tightest of its budgets."""

    warn: bool = False
    downgrade: bool = False
    downgrade_to: str | None = None  # None with downgrade: the gateway picks the cheapest
    fraction: float = 0.0
    forecast_fraction: float = 0.0
    budget: str | None = None  # the budget that triggered warn/downgrade
    message: str | None = None


@attrs.frozen
class CounterView:
    counter: CounterId
    config: BudgetConfig
    fraction: float
    forecast_fraction: float


@attrs.frozen
class BookStatistics:
    budgets: int
    counters: int
    reservations: int
    reserved_usd: float
    reserved_calls: int
    refused_calls: int
    reconciled_calls: int
    expired_reservations: int


@attrs.define
class _Reservation:
    items: list[tuple[CounterId, float, float]]
    created: float


@attrs.define(eq=False)
class BudgetBook:
    budgets: Sequence[BudgetConfig]
    settings: BudgetSettings = attrs.field(factory=BudgetSettings)
    _labels: list[str] = attrs.field(init=False)
    _by_label: dict[str, BudgetConfig] = attrs.field(init=False)
    _counters: dict[CounterId, Counter] = attrs.field(init=False, factory=dict)
    _reservations: dict[str, _Reservation] = attrs.field(init=False, factory=dict)
    # ids reconciled lately (reconcile is idempotent): 16 bytes each, in fixed memory
    _recent: RecentKeys = attrs.field(init=False, factory=lambda: RecentKeys(_RECENT_RECONCILED))
    _reserved_calls: int = attrs.field(init=False, default=0)
    _refused_calls: int = attrs.field(init=False, default=0)
    _reconciled_calls: int = attrs.field(init=False, default=0)
    _expired: int = attrs.field(init=False, default=0)

    def __attrs_post_init__(self) -> None:
        self._labels = unique_labels([b.label for b in self.budgets])
        self._by_label = dict(zip(self._labels, self.budgets, strict=True))

    # ---- counters ----------------------------------------------------------------------

    def _counter(self, cid: CounterId, now: float) -> Counter:
        counter = self._counters.get(cid)
        if counter is None:
            b = self._by_label[cid.budget]
            counter = Counter.new(
                b.window,
                b.rolling,
                b.max_cost_usd,
                b.max_tokens,
                interval_s=self.settings.forecast_interval_s,
                alpha=self.settings.forecast_alpha,
                now=now,
            )
            self._counters[cid] = counter
        counter.advance(now)
        return counter

    def counter_ids(self, scopes: RequestScopes) -> list[CounterId]:
        return [CounterId(self._labels[i], v) for i, v in counters_for(self.budgets, scopes)]

    # ---- reserve / reconcile -----------------------------------------------------------

    def reserve(
        self, request_id: str, scopes: RequestScopes, cost: float, tokens: int, now: float
    ) -> Reserved | Refused:
        """Hold ``cost``/``tokens`` in every counter of the request, or refuse and hold none."""
        if request_id in self._reservations:  # a retried pre-flight replaces the old hold
            self._release(request_id)
        ids = self.counter_ids(scopes)
        counters = [self._counter(cid, now) for cid in ids]
        for cid, counter in zip(ids, counters, strict=True):
            dimension = counter.fits(cost, tokens)
            if dimension is not None:
                self._refused_calls += 1
                b = self._by_label[cid.budget]
                cap = counter.max_cost if dimension == "cost" else counter.max_tokens
                used = (
                    counter.spent_cost + counter.reserved_cost
                    if dimension == "cost"
                    else counter.spent_tokens + counter.reserved_tokens
                )
                resets = counter.resets_at(now)
                return Refused(
                    budget=cid.budget,
                    scope=b.scope,
                    value=cid.value,
                    dimension=dimension,
                    cap=float(cap or 0),
                    used=used,
                    resets_at=None if resets == float("inf") else resets,
                    retry_after_s=counter.retry_after(dimension, cost, tokens, now),
                )
        for counter in counters:
            counter.reserved_cost += cost
            counter.reserved_tokens += tokens
            counter.holds += 1
        self._reservations[request_id] = _Reservation(
            [(cid, cost, float(tokens)) for cid in ids], now
        )
        self._reserved_calls += 1
        return Reserved(request_id, cost, tokens, tuple(ids))

    def _release(self, request_id: str) -> _Reservation | None:
        reservation = self._reservations.pop(request_id, None)
        if reservation is None:
            return None
        for cid, cost, tokens in reservation.items:
            counter = self._counters.get(cid)
            if counter is not None:
                counter.reserved_cost = max(counter.reserved_cost - cost, 0.0)
                counter.reserved_tokens = max(counter.reserved_tokens - tokens, 0.0)
                counter.holds -= 1
                if counter.holds <= 0:
                    counter.holds = 0
                    counter.reserved_cost = counter.reserved_tokens = 0.0  # no float residue
        return reservation

    def reconcile(
        self,
        request_id: str,
        actual_cost: float,
        actual_tokens: int,
        now: float,
        scopes: RequestScopes | None = None,
    ) -> bool:
        """Release the reservation and record the actual spend. Idempotent per request id.

        An unknown id is a no-op unless ``scopes`` is given (the reservation expired, or the
        request skipped pre-flight): then the spend is recorded against those scopes.
        """
        key = compact_key(request_id)
        if self._recent.contains_compact(key):
            return False
        reservation = self._release(request_id)
        if reservation is not None:
            ids = [cid for cid, _, _ in reservation.items]
        elif scopes is not None and (actual_cost > 0 or actual_tokens > 0):
            ids = self.counter_ids(scopes)
        else:
            return False
        for cid in ids:
            if cid.budget in self._by_label:
                self._counter(cid, now).add_spend(actual_cost, actual_tokens, now)
        self._recent.add_compact(key)  # evicts the oldest id once _RECENT_RECONCILED are held
        self._reconciled_calls += 1
        return True

    def expire(self, now: float) -> list[str]:
        """Release reservations older than the TTL (their reconcile was lost)."""
        ttl = self.settings.reservation_ttl_s
        stale = [rid for rid, r in self._reservations.items() if now - r.created >= ttl]
        for rid in stale:
            self._release(rid)
        self._expired += len(stale)
        return stale

    def reservations(self) -> int:
        return len(self._reservations)

    # ---- fractions, forecast, soft landing ---------------------------------------------

    def views(self, scopes: RequestScopes, now: float) -> list[CounterView]:
        out = []
        for cid in self.counter_ids(scopes):
            counter = self._counter(cid, now)
            out.append(
                CounterView(
                    cid,
                    self._by_label[cid.budget],
                    counter.fraction(),
                    counter.forecast(now, self.settings.forecast_min_samples),
                )
            )
        return out

    def fraction(self, scopes: RequestScopes, now: float) -> float:
        return max((v.fraction for v in self.views(scopes, now)), default=0.0)

    def forecast_fraction(self, scopes: RequestScopes, now: float) -> float:
        return max((v.forecast_fraction for v in self.views(scopes, now)), default=0.0)

    def soft_landing(self, scopes: RequestScopes, now: float) -> Decision:
        return soft_landing(self.views(scopes, now), scopes.model)

    # ---- admin and persistence ---------------------------------------------------------

    def admin(self, now: float) -> list[dict[str, Any]]:
        """One row per counter for ``GET /admin/budgets``."""
        rows = []
        for cid, counter in self._counters.items():
            counter.advance(now)
            b = self._by_label[cid.budget]
            rows.append(
                {
                    "budget": cid.budget,
                    "scope": b.scope,
                    "value": cid.value,
                    "window": b.window,
                    "rolling": b.rolling,
                    "spent_usd": round(counter.spent_cost, 9),
                    "spent_tokens": int(counter.spent_tokens),
                    "reserved_usd": round(counter.reserved_cost, 9),
                    "reserved_tokens": int(counter.reserved_tokens),
                    "max_cost_usd": b.max_cost_usd,
                    "max_tokens": b.max_tokens,
                    "fraction": round(counter.fraction(), 6),
                    "forecast_fraction": round(
                        counter.forecast(now, self.settings.forecast_min_samples), 6
                    ),
                    "burn_rate_usd_per_hour": round(counter.rate_cost * 3600, 9),
                    "resets_at": iso(counter.resets_at(now)),
                }
            )
        return rows

    def snapshot(self) -> dict[str, Any]:
        """JSON-able state; reservations are not saved (their requests die with the process)."""
        return {
            "version": SNAPSHOT_VERSION,
            "counters": [
                {"budget": cid.budget, "value": cid.value, **c.to_dict()}
                for cid, c in self._counters.items()
            ],
        }

    def restore(self, data: dict[str, Any], now: float) -> int:
        """Load a snapshot; budgets no longer configured are dropped. Returns counters loaded."""
        if data.get("version") != SNAPSHOT_VERSION:
            raise ValueError(f"unsupported budget snapshot version {data.get('version')!r}")
        loaded = 0
        for row in data.get("counters", []):
            cid = CounterId(str(row["budget"]), str(row["value"]))
            if cid.budget not in self._by_label:
                continue
            self._counter(cid, now).load_dict(row, now)
            loaded += 1
        return loaded

    def statistics(self) -> BookStatistics:
        return BookStatistics(
            budgets=len(self.budgets),
            counters=len(self._counters),
            reservations=len(self._reservations),
            reserved_usd=round(sum(c.reserved_cost for c in self._counters.values()), 9),
            reserved_calls=self._reserved_calls,
            refused_calls=self._refused_calls,
            reconciled_calls=self._reconciled_calls,
            expired_reservations=self._expired,
        )


def _has_target(view: CounterView) -> bool:
    landing = view.config.soft_landing
    return landing is not None and landing.downgrade_to is not None


def soft_landing(views: Sequence[CounterView], model: str | None = None) -> Decision:
    """Warn / downgrade from the tightest budget with a ``soft_landing`` block.

    Each budget acts on its current fraction, or on max(current, forecast) with
    ``act_on: forecast``. The hard cap is never decided here (that is ``reserve``).
    """
    fraction = max((v.fraction for v in views), default=0.0)
    forecast = max((v.forecast_fraction for v in views), default=0.0)
    warn_by: tuple[float, CounterView] | None = None
    down_by: tuple[float, CounterView] | None = None
    for v in views:
        landing = v.config.soft_landing
        if landing is None:
            continue
        level = v.fraction if landing.act_on == "current" else max(v.fraction, v.forecast_fraction)
        if level + _EPS >= landing.warn_at and (warn_by is None or level > warn_by[0]):
            warn_by = (level, v)
        if level + _EPS >= landing.downgrade_at and (
            down_by is None
            or (level, landing.downgrade_to is not None) > (down_by[0], _has_target(down_by[1]))
        ):
            down_by = (level, v)
    if warn_by is None:
        return Decision(fraction=fraction, forecast_fraction=forecast)
    level, trigger = down_by if down_by is not None else warn_by
    target = None
    if down_by is not None and trigger.config.soft_landing is not None:
        target = trigger.config.soft_landing.downgrade_to
    downgrade = down_by is not None and not (target is not None and target == model)
    basis = "forecast" if level > trigger.fraction + _EPS else "spend"
    what = f"downgraded to {target or 'a cheaper model'}" if downgrade else "warning"
    message = (
        f"{trigger.counter.describe(trigger.config.scope)} is at {level:.0%} of its cap "
        f"(by {basis}); {what}"
    )
    return Decision(
        warn=True,
        downgrade=downgrade,
        downgrade_to=target if downgrade else None,
        fraction=fraction,
        forecast_fraction=forecast,
        budget=trigger.counter.budget,
        message=message,
    )
