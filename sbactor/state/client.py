"""StateClient: the one Redis connection pool of a process, with health tracking.

Commands go through ``sbactor.state.resp`` (a minimal RESP client on trio; scripts run by
EVALSHA, re-sent once after ``NOSCRIPT``).

Actors hold a reference and call ``run_script``; nobody else talks to Redis. After a failure
(connection refused, timeout, any Redis error) the client is *down*: calls fail at once with
``StateUnavailable`` (no per-request timeout while Redis is gone) and a probe pings Redis until
it answers, then listeners are told it is back (the BudgetTracker pushes the spend it recorded
locally meanwhile).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import attrs
import trio

from sbactor.config import StateConfig
from sbactor.state.resp import RedisError, RespClient
from sbactor.state.scripts import SCRIPTS

log = logging.getLogger("sbactor.state")


class StateUnavailable(Exception):
    """Redis cannot be used right now; the message says why."""


@attrs.frozen
class StateHealth:
    backend: str
    url: str
    up: bool
    last_error: str | None
    down_since: float | None  # epoch s
    calls: int
    failures: int
    outages: int


def _redacted(url: str) -> str:
    """The URL without a password (``redis://:secret@host`` → ``redis://***@host``)."""
    scheme, sep, rest = url.partition("://")
    if "@" in rest:
        rest = "***@" + rest.split("@", 1)[1]
    return f"{scheme}{sep}{rest}"


@attrs.define(eq=False)
class StateClient:
    config: StateConfig
    up: bool = False
    last_error: str | None = "not connected yet"
    down_since: float | None = attrs.field(factory=time.time)
    _redis: RespClient = attrs.field(
        init=False, default=attrs.Factory(lambda self: RespClient(self.config.url), takes_self=True)
    )
    _listeners: list[Callable[[], None]] = attrs.field(factory=list)
    _cancel: trio.CancelScope | None = None
    _calls: int = 0
    _failures: int = 0
    _outages: int = 0

    @property
    def prefix(self) -> str:
        return self.config.key_prefix

    def on_recover(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` (sync, must not block) each time Redis comes back."""
        self._listeners.append(listener)

    def health(self) -> StateHealth:
        return StateHealth(
            backend=self.config.backend,
            url=_redacted(self.config.url),
            up=self.up,
            last_error=self.last_error,
            down_since=self.down_since,
            calls=self._calls,
            failures=self._failures,
            outages=self._outages,
        )

    def unavailable_reason(self) -> str | None:
        if self.up:
            return None
        where = _redacted(self.config.url)
        return f"shared state (redis at {where}) unavailable: {self.last_error}"

    # ---- lifecycle ---------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[StateClient] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Connect (a Redis that is down at start is not fatal: the probe keeps trying), then
        probe while down until cancelled by ``stop``."""
        timeout = self.config.timeout_s
        with trio.CancelScope() as scope:
            self._cancel = scope
            try:
                await self._probe()
                if not self.up:
                    log.error("%s; will keep trying", self.unavailable_reason())
                task_status.started(self)
                interval = min(max(timeout, 0.05), 1.0)
                while True:
                    await trio.sleep(interval)
                    if not self.up:
                        await self._probe()
            finally:
                with trio.CancelScope(shield=True):
                    await self._redis.aclose()

    def stop(self) -> None:
        if self._cancel is not None:
            self._cancel.cancel()

    async def _probe(self) -> None:
        try:
            with trio.fail_after(self.config.timeout_s):
                await self._redis.execute("PING")
        except Exception as exc:
            self._mark_down(exc)
            await self._redis.reset()
            return
        self._mark_up()

    def _mark_up(self) -> None:
        if self.up:
            return
        was_outage = self._outages > 0
        self.up = True
        self.last_error = None
        self.down_since = None
        if was_outage:
            log.warning("shared state (redis) is back")
        for listener in self._listeners:
            try:
                listener()
            except Exception:
                log.exception("state recovery listener failed")

    def _mark_down(self, exc: BaseException) -> None:
        if isinstance(exc, trio.TooSlowError):
            reason = f"timed out after {self.config.timeout_s} s"
        else:
            reason = str(exc) or type(exc).__name__
        self.last_error = reason
        if self.up:
            self.up = False
            self._outages += 1
            self.down_since = time.time()
            log.error("shared state (redis) unavailable: %s", reason)

    # ---- calls -------------------------------------------------------------------------------

    async def run_script(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """Run one of ``SCRIPTS`` atomically; ``StateUnavailable`` if Redis cannot answer now."""
        return await self._guarded(self._redis.evalsha, SCRIPTS[name], keys, args)

    async def run_scripts(
        self, calls: Sequence[tuple[str, Sequence[str], Sequence[Any]]]
    ) -> list[Any]:
        """Several of ``SCRIPTS`` in one round trip, in order (each atomic on its own)."""
        result: list[Any] = await self._guarded(self._scripts_or_raise, calls)
        return result

    async def _scripts_or_raise(
        self, calls: Sequence[tuple[str, Sequence[str], Sequence[Any]]]
    ) -> list[Any]:
        replies = await self._redis.evalsha_many(
            [(SCRIPTS[name], keys, args) for name, keys, args in calls])
        for reply in replies:
            if isinstance(reply, RedisError):
                raise reply
        return replies

    async def command(self, *args: Any) -> Any:
        """One plain command (GET, SET, SCAN, …); same failure rules as ``run_script``."""
        return await self._guarded(self._redis.execute, *args)

    async def pipeline(self, commands: Sequence[Sequence[Any]]) -> list[Any]:
        """Several commands in one round trip; error replies come back as values."""
        result: list[Any] = await self._guarded(self._redis.pipeline, commands)
        return result

    async def _guarded(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        if not self.up:
            raise StateUnavailable(self.unavailable_reason() or "redis is down")
        self._calls += 1
        try:
            with trio.fail_after(self.config.timeout_s):
                return await fn(*args)
        except Exception as exc:
            self._failures += 1
            self._mark_down(exc)
            await self._redis.reset()
            raise StateUnavailable(self.unavailable_reason() or str(exc)) from exc
