"""Load shedding by event-loop lag: a saturated gateway refuses new work with 503 at once
instead of queueing it until clients time out and memory grows.

The signal is how late a short sleep wakes up. When the one trio thread has more runnable work
than it can do, every wake-up is late by about one scheduling round, so the smoothed lag rises
with saturation and falls as soon as the backlog clears — no tuning to request rates needed.
"""

from __future__ import annotations

import attrs
import trio


@attrs.define(eq=False)
class LoopLag:
    interval_s: float = 0.01
    alpha: float = 0.3  # EWMA weight of the newest sample
    lag_s: float = 0.0
    _scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with self._scope:
            task_status.started()
            while True:
                before = trio.current_time()
                await trio.sleep(self.interval_s)
                late = max(0.0, trio.current_time() - before - self.interval_s)
                self.lag_s += self.alpha * (late - self.lag_s)

    def stop(self) -> None:
        self._scope.cancel()
