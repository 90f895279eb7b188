"""SharedBudgetTracker: the BudgetTracker with its counters in Redis (``state.backend: redis``).

Pre-flight is one Lua script (``scripts.RESERVE``): every rate limit and every budget counter of
the request is checked and, only if all admit it, the worst case is reserved in all of them —
so concurrent requests on any number of instances cannot overshoot a cap. Reconcile swaps the
reservation for the actual spend. Calendar-window keys expire on their own after the window.

Redis unavailable:
- ``fail_closed``: pre-flight refuses (``kind="unavailable"`` → 503 with the reason).
- ``fail_open``: the inherited local book and limiter decide (``degraded=True`` → the event is
  tagged ``state_degraded``); the spend of those requests (and reconciles that could not reach
  Redis) is queued and pushed to Redis when it answers again.
Every spend is also recorded in the local book, so local counters fall back on at least this
instance's own spend.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Sequence
from typing import Any

import attrs
import trio

from sbactor.actors.budget_tracker import (
    AdminSnapshot,
    BudgetTracker,
    PreflightRequest,
    PreflightResult,
    Reconcile,
    _rate_refusal,
    _Tick,
)
from sbactor.actors.runtime import ActorClosed, NotInline
from sbactor.budget.book import CounterView, Refused, soft_landing
from sbactor.budget.counter import sample_interval, used_fraction
from sbactor.budget.ratelimit import RateRefused
from sbactor.budget.scopes import CounterId, RequestScopes, counters_for, rate_counters_for
from sbactor.budget.shared_burn import SharedBurn
from sbactor.budget.windows import iso, window_end, window_start
from sbactor.state.client import StateClient, StateUnavailable

log = logging.getLogger("sbactor.state.budget")

#: Spend waiting for Redis to come back (oldest dropped beyond this, with an error log).
MAX_PENDING = 100_000
#: Messages per Redis round trip (pre-flights and reconciles pipelined: see handle_batch).
BATCH = 64
#: Window keys live this long past their window's end (late reconciles still land).
KEY_GRACE_S = 3600
#: An in-flight entry whose reconcile never came is forgotten this many reservation TTLs after
#: its admission (Redis released its hold after one TTL).
STALE_HOLD_TTLS = 2


def _glob_escape(text: str) -> str:
    """``text`` as a literal in a Redis glob pattern."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


@attrs.frozen
class _Held:
    member: str
    rate_keys: tuple[str, ...]
    budget_keys: tuple[str, ...]  # counter, holds, counter, holds, ...
    ttls: tuple[int, ...]
    tokens: int
    second: int
    scopes: RequestScopes


@attrs.frozen
class _Flush:
    pass


@attrs.define(eq=False)
class SharedBudgetTracker(BudgetTracker):
    state: StateClient | None = None
    fail_open: bool = False

    # in-flight requests (popped by their reconcile; one whose reconcile was lost is forgotten
    # after STALE_HOLD_TTLS reservation TTLs, see _forget_stale)
    _held: dict[str, _Held] = attrs.field(init=False, factory=dict)
    _local: dict[str, tuple[RequestScopes, float]] = attrs.field(init=False, factory=dict)
    _forgotten: int = attrs.field(init=False, default=0)
    _pending: deque[tuple[_Held, float, int]] = attrs.field(init=False, factory=deque)
    _shared_refused: int = attrs.field(init=False, default=0)
    _degraded_calls: int = attrs.field(init=False, default=0)
    _unavailable_refusals: int = attrs.field(init=False, default=0)
    _flushed: int = attrs.field(init=False, default=0)
    # the shared burn rate per counter, from the shared spend read at each pre-flight
    _burn: dict[CounterId, SharedBurn] = attrs.field(init=False, factory=dict)

    async def on_start(self) -> None:
        await super().on_start()
        self.batch_size = max(self.batch_size, BATCH)
        if self.state is not None:
            self.state.on_recover(self._request_flush)

    def _request_flush(self) -> None:
        try:
            self.cast_nowait(_Flush())
        except (ActorClosed, trio.WouldBlock):  # full mailbox: the next tick flushes
            pass

    def handle_now(self, message: Any) -> Any:
        raise NotInline  # every pre-flight is a Redis round trip, batched per drain

    async def handle_batch(self, messages: Sequence[Any]) -> list[Any]:
        """Every pre-flight and reconcile waiting in the mailbox goes to Redis in one pipelined
        round trip (in mailbox order; each script is still atomic on its own), so under load
        the actor is not bounded by one Redis round trip per message."""
        results: list[Any] = []
        run: list[Any] = []
        for message in messages:
            if isinstance(message, PreflightRequest | Reconcile):
                run.append(message)
                continue
            if run:
                results += await self._scripted(run)
                run = []
            results.append(await self.handle(message))
        if run:
            results += await self._scripted(run)
        return results

    async def handle(self, message: Any) -> Any:
        if isinstance(message, PreflightRequest | Reconcile):
            [result] = await self._scripted([message])
            return result
        if isinstance(message, _Flush):
            await self._flush()
            return None
        if isinstance(message, AdminSnapshot):
            return await self._admin_rows()
        if isinstance(message, _Tick):
            self._forget_stale(self._now())
        result = await super().handle(message)
        if self._pending:
            await self._flush()
        return result

    # ---- keys ----------------------------------------------------------------------------------

    def _keys(
        self, scopes: RequestScopes, now: float
    ) -> tuple[list[str], list[tuple[str, str, int]]]:
        assert self.state is not None
        prefix = self.state.prefix
        rate_keys = [
            f"{prefix}r:{self.rate_limits[i].label}#{i}:{value}"
            for i, value in rate_counters_for(self.rate_limits, scopes)
        ]
        budget_keys = []
        for i, value in counters_for(self.budgets, scopes):
            b = self.budgets[i]
            label = self._book._labels[i]
            start = window_start(b.window, now)
            end = window_end(b.window, now)
            tag = "total" if math.isinf(start) else str(int(start))
            ttl = -1 if math.isinf(end) else int(end - now) + KEY_GRACE_S
            budget_keys.append((f"{prefix}b:{label}:{value}:{tag}", label, ttl))
        return rate_keys, budget_keys

    # ---- pre-flight --------------------------------------------------------------------------

    async def _scripted(self, messages: Sequence[PreflightRequest | Reconcile]) -> list[Any]:
        """Plan each message's script, run them all in one round trip, then finish each."""
        assert self.state is not None
        now = self._now()
        plans: list[tuple[str, list[str], list[Any], Any] | None] = []
        for message in messages:
            if isinstance(message, PreflightRequest):
                plans.append(self._plan_preflight(message, now))
            else:
                plans.append(await self._plan_reconcile(message, now))
        calls = [(name, keys, args) for plan in plans if plan is not None
                 for name, keys, args, _ctx in (plan,)]
        try:
            replies = await self.state.run_scripts(calls) if calls else []
        except StateUnavailable as exc:
            replies = [exc] * len(calls)
        answers = iter(replies)
        results: list[Any] = []
        for message, plan in zip(messages, plans, strict=True):
            if plan is None:
                results.append(None)
                continue
            reply = next(answers)
            if isinstance(message, PreflightRequest):
                results.append(self._finish_preflight(message, plan[3], reply, now))
            else:
                held, cost, tokens = plan[3]
                if isinstance(reply, StateUnavailable):
                    self._queue(held, cost, tokens)
                results.append(None)
        return results

    def _plan_preflight(
        self, req: PreflightRequest, now: float
    ) -> tuple[str, list[str], list[Any], Any]:
        assert self.state is not None
        tokens = req.input_tokens + req.max_output_tokens
        rate_keys, budget_keys = self._keys(req.scopes, now)
        cost = req.cost_estimate_usd
        member = f"{req.request_id}|{cost!r}|{tokens}"
        args: list[Any] = [repr(now), member, repr(cost), tokens, len(rate_keys),
                           self.settings.reservation_ttl_s]
        for i, _ in rate_counters_for(self.rate_limits, req.scopes):
            limit = self.rate_limits[i]
            args += [-1 if limit.rpm is None else limit.rpm, -1 if limit.tpm is None else limit.tpm]
        keys = list(rate_keys)
        budget_ids = counters_for(self.budgets, req.scopes)
        for (key, _label, ttl), (i, _v) in zip(budget_keys, budget_ids, strict=True):
            b = self.budgets[i]
            keys += [key, key + ":h"]
            args += [-1 if b.max_cost_usd is None else b.max_cost_usd,
                     -1 if b.max_tokens is None else b.max_tokens, ttl]
        return "reserve", keys, args, (member, rate_keys, budget_keys, budget_ids, cost, tokens)

    def _finish_preflight(
        self, req: PreflightRequest, ctx: Any, reply: Any, now: float
    ) -> PreflightResult:
        if isinstance(reply, StateUnavailable):
            return self._unavailable(req, str(reply))
        member, rate_keys, budget_keys, budget_ids, cost, tokens = ctx
        status = reply[0]
        if status == "rate":
            li, lvalue = rate_counters_for(self.rate_limits, req.scopes)[int(reply[1]) - 1]
            limit = self.rate_limits[li]
            cap = limit.rpm if reply[2] == "rpm" else limit.tpm
            self._shared_refused += 1
            refused = RateRefused(limit.label, limit.scope, lvalue, reply[2], int(cap or 0),
                                  float(reply[3]), float(reply[4]))
            return _rate_refusal(refused, now)
        if status == "budget":
            index = int(reply[1]) - 1
            bi, value = budget_ids[index]
            self._shared_refused += 1
            return self._budget_refusal(bi, value, reply[2], float(reply[3]), float(reply[4]),
                                        cost, tokens, now)
        # admitted: soft landing from the shared fractions and burn rates (before this
        # request's hold)
        views = []
        for n, (bi, value) in enumerate(budget_ids):
            b = self.budgets[bi]
            cid = CounterId(self._book._labels[bi], value)
            used_cost, used_tokens, spent_cost, spent_tokens = (
                float(v) for v in reply[1 + 4 * n : 5 + 4 * n]
            )
            burn = self._shared_burn(cid, bi)
            burn.observe(now, window_start(b.window, now), spent_cost, spent_tokens)
            fraction = used_fraction(used_cost, used_tokens, b.max_cost_usd, b.max_tokens)
            forecast = burn.forecast(now, window_end(b.window, now), used_cost, used_tokens,
                                     b.max_cost_usd, b.max_tokens,
                                     self.settings.forecast_min_samples)
            views.append(CounterView(cid, b, fraction, forecast))
        decision = soft_landing(views, req.scopes.model)
        flat_keys = tuple(k for key, _l, _t in budget_keys for k in (key, key + ":h"))
        self._held[req.request_id] = _Held(
            member, tuple(rate_keys), flat_keys, tuple(t for _k, _l, t in budget_keys),
            tokens, math.floor(now), req.scopes,
        )
        self._note_warning(decision, now)
        return PreflightResult.admitted(decision, cost)

    def _shared_burn(self, cid: CounterId, bi: int) -> SharedBurn:
        burn = self._burn.get(cid)
        if burn is None:
            interval = sample_interval(self.budgets[bi].window, self.settings.forecast_interval_s)
            burn = self._burn[cid] = SharedBurn(interval, self.settings.forecast_alpha)
        return burn

    def _budget_refusal(
        self, bi: int, value: str, dimension: str, spent: float, reserved: float,
        cost: float, tokens: int, now: float,
    ) -> PreflightResult:
        b = self.budgets[bi]
        cap = float((b.max_cost_usd if dimension == "cost" else b.max_tokens) or 0)
        amount = cost if dimension == "cost" else float(tokens)
        end = window_end(b.window, now)
        if amount > cap or (spent + amount > cap and math.isinf(end)):
            retry: float | None = None
        elif spent + amount <= cap:
            retry = 1.0  # only in-flight reservations are in the way
        else:
            retry = max(end - now, 1.0)
        refused = Refused(
            budget=self._book._labels[bi], scope=b.scope, value=value, dimension=dimension,
            cap=cap, used=spent + reserved, resets_at=None if math.isinf(end) else end,
            retry_after_s=retry,
        )
        return PreflightResult(
            ok=False, kind="budget", scope=refused.description, message=refused.message,
            retry_after_s=refused.retry_after_s, resets_at=refused.resets_at_iso,
            fraction=min((spent + reserved) / cap, 1.0) if cap else 1.0, budget_exceeded=True,
        )

    def _unavailable(self, req: PreflightRequest, reason: str) -> PreflightResult:
        if not self.fail_open:
            self._unavailable_refusals += 1
            return PreflightResult(
                ok=False,
                kind="unavailable",
                message=f"{reason}; refusing paid requests (state.on_unavailable: fail_closed)",
                retry_after_s=1.0,
            )
        self._degraded_calls += 1
        result = self._preflight(req)  # the inherited local book and limiter
        if result.ok:
            self._local[req.request_id] = (req.scopes, self._now())
        return attrs.evolve(result, degraded=True)

    # ---- reconcile ---------------------------------------------------------------------------

    async def _plan_reconcile(
        self, message: Reconcile, now: float
    ) -> tuple[str, list[str], list[Any], Any] | None:
        held = self._held.pop(message.request_id, None)
        local = self._local.pop(message.request_id, None)
        local_scopes = None if local is None else local[0]
        if held is None and local_scopes is None:
            if message.scopes is None or (message.actual_cost_usd <= 0 and
                                          message.actual_tokens <= 0):
                return None
            # no pre-flight here (expired, or skipped): record the spend against the scopes
            held = self._spend_only(message.scopes, now)
        # the local book mirrors this instance's spend (fail_open falls back on it)
        scopes = message.scopes or (held.scopes if held is not None else local_scopes)
        await super().handle(attrs.evolve(message, scopes=scopes))
        if local_scopes is not None:
            held = self._spend_only(local_scopes, now)  # decided locally: push the spend only
        assert held is not None
        cost, tokens = message.actual_cost_usd, message.actual_tokens
        keys, args = self._reconcile_call(held, cost, tokens, now)
        return "reconcile", keys, args, (held, cost, tokens)

    def _forget_stale(self, now: float) -> int:
        """Drop in-flight entries whose reconcile never came (it timed out on a full mailbox):
        ``STALE_HOLD_TTLS`` reservation TTLs after admission, long after Redis released the
        hold, so the maps stay bounded. Returns how many were dropped."""
        horizon = now - STALE_HOLD_TTLS * self.settings.reservation_ttl_s
        held = [rid for rid, h in self._held.items() if h.second < horizon]
        local = [rid for rid, (_s, at) in self._local.items() if at < horizon]
        for rid in held:
            del self._held[rid]
        for rid in local:
            del self._local[rid]
        dropped = len(held) + len(local)
        if dropped:
            self._forgotten += dropped
            log.warning("forgot %d in-flight budget holds whose reconcile never came", dropped)
        return dropped

    def _spend_only(self, scopes: RequestScopes, now: float) -> _Held:
        _rate_keys, budget_keys = self._keys(scopes, now)
        return _Held(
            "", (), tuple(k for key, _l, _t in budget_keys for k in (key, key + ":h")),
            tuple(t for _k, _l, t in budget_keys), 0, math.floor(now), scopes,
        )

    @staticmethod
    def _reconcile_call(
        held: _Held, cost: float, tokens: int, now: float
    ) -> tuple[list[str], list[Any]]:
        keys = list(held.rate_keys) + list(held.budget_keys)
        args: list[Any] = [repr(now), held.member, repr(cost), tokens, held.tokens, held.second,
                           len(held.rate_keys), *held.ttls]
        return keys, args

    async def _push(self, held: _Held, cost: float, tokens: int, now: float) -> bool:
        assert self.state is not None
        keys, args = self._reconcile_call(held, cost, tokens, now)
        try:
            await self.state.run_script("reconcile", keys, args)
        except StateUnavailable:
            return False
        return True

    def _queue(self, held: _Held, cost: float, tokens: int) -> None:
        if len(self._pending) >= MAX_PENDING:
            self._pending.popleft()
            log.error("budget spend queue for redis is full; the oldest entry was dropped")
        self._pending.append((held, cost, tokens))

    async def _flush(self) -> None:
        """Push the spend recorded while Redis was unreachable."""
        if self.state is None or not self.state.up:
            return
        now = self._now()
        while self._pending:
            held, cost, tokens = self._pending[0]
            if not await self._push(held, cost, tokens, now):
                return
            self._pending.popleft()
            self._flushed += 1
        log.info("budget spend caught up with redis (%d pushed so far)", self._flushed)

    # ---- admin -------------------------------------------------------------------------------

    async def _admin_rows(self) -> list[dict[str, Any]]:
        """``GET /admin/budgets``: the shared counters of the current windows, read from Redis
        (``source: "redis"``; ``instance_spent_usd`` is this process's share), plus counters
        only this process knows (``source: "local"``). Redis unavailable: the local mirror,
        every row marked ``source: "local"``."""
        now = self._now()
        local_rows = self._book.admin(now)
        for row in local_rows:
            row["source"] = "local"
        if self.state is None or not self.state.up:
            return local_rows
        try:
            found = await self._shared_counters(now)
            replies = await self.state.pipeline([
                ("HMGET", key, "spent_cost", "spent_tokens", "reserved_cost", "reserved_tokens")
                for _i, _value, key in found
            ]) if found else []
        except StateUnavailable:
            return local_rows
        by_id = {(row["budget"], row["value"]): row for row in local_rows}
        rows: list[dict[str, Any]] = []
        for (bi, value, _key), reply in zip(found, replies, strict=True):
            if not isinstance(reply, list):
                continue
            b = self.budgets[bi]
            label = self._book._labels[bi]
            spent, tokens, reserved, reserved_tokens = (float(v or 0) for v in reply)
            fraction = used_fraction(spent + reserved, tokens + reserved_tokens, b.max_cost_usd,
                                     b.max_tokens)
            mine = by_id.pop((label, value), None)
            end = window_end(b.window, now)
            burn = self._burn.get(CounterId(label, value))
            if burn is None:  # this process has not served this counter yet: no readings
                forecast, rate = fraction, None
            else:
                forecast = burn.forecast(now, end, spent + reserved, tokens + reserved_tokens,
                                         b.max_cost_usd, b.max_tokens,
                                         self.settings.forecast_min_samples)
                rate = round(burn.rate_cost * 3600, 9)
            rows.append({
                "budget": label,
                "scope": b.scope,
                "value": value,
                "window": b.window,
                "rolling": b.rolling,
                "spent_usd": round(spent, 9),
                "spent_tokens": int(tokens),
                "reserved_usd": round(max(reserved, 0.0), 9),
                "reserved_tokens": int(max(reserved_tokens, 0.0)),
                "max_cost_usd": b.max_cost_usd,
                "max_tokens": b.max_tokens,
                "fraction": round(fraction, 6),
                "forecast_fraction": round(forecast, 6),
                "burn_rate_usd_per_hour": rate,  # all instances, from the shared spend
                "resets_at": None if math.isinf(end) else iso(end),
                "source": "redis",
                "instance_spent_usd": 0.0 if mine is None else mine["spent_usd"],
            })
        rows.extend(by_id.values())
        return rows

    async def _shared_counters(self, now: float) -> list[tuple[int, str, str]]:
        """(budget index, scope value, key) of every budget counter in Redis for the current
        window (SCAN: admin only, never on the request path)."""
        assert self.state is not None
        prefix = f"{self.state.prefix}b:"
        keys: list[str] = []
        cursor = "0"
        while True:
            cursor, batch = await self.state.command(
                "SCAN", cursor, "MATCH", _glob_escape(prefix) + "*", "COUNT", 1000)
            keys.extend(k for k in batch if not k.endswith(":h"))
            if cursor == "0":
                break
        labels = sorted(enumerate(self._book._labels), key=lambda il: -len(il[1]))
        found = []
        for key in sorted(set(keys)):
            rest = key[len(prefix):]
            for bi, label in labels:
                if not rest.startswith(label + ":"):
                    continue
                value, _, tag = rest[len(label) + 1:].rpartition(":")
                start = window_start(self.budgets[bi].window, now)
                if tag == ("total" if math.isinf(start) else str(int(start))):
                    found.append((bi, value, key))
                break
        return found

    def state_summary(self) -> dict[str, Any]:
        out = super().state_summary()
        out.update({
            "backend": "redis",
            "on_unavailable": "fail_open" if self.fail_open else "fail_closed",
            "shared_reservations": len(self._held),
            "forgotten_holds": self._forgotten,
            "shared_refused": self._shared_refused,
            "degraded_calls": self._degraded_calls,
            "unavailable_refusals": self._unavailable_refusals,
            "pending_spend": len(self._pending),
            "pushed_after_outage": self._flushed,
            "redis": None if self.state is None else attrs.asdict(self.state.health()),
        })
        return out

