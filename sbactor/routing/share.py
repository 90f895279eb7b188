"""Share of traffic per deployment over a sliding window of recent choices (pure)."""

from __future__ import annotations

from collections import Counter, deque

import attrs


@attrs.define(eq=False)
class ShareWindow:
    """Counts the last ``window`` routing choices per model; O(1) per choice."""

    window: int = 1000
    _recent: dict[str, deque[str]] = attrs.field(init=False, factory=dict)
    _counts: dict[str, Counter[str]] = attrs.field(init=False, factory=dict)

    def note(self, model: str, deployment_id: str) -> None:
        recent = self._recent.get(model)
        if recent is None:
            recent = self._recent[model] = deque()
            self._counts[model] = Counter()
        counts = self._counts[model]
        if len(recent) >= self.window:
            old = recent.popleft()
            counts[old] -= 1
            if counts[old] <= 0:
                del counts[old]
        recent.append(deployment_id)
        counts[deployment_id] += 1

    def shares(self, model: str) -> dict[str, float]:
        """Fraction of the model's recent choices that went to each deployment."""
        counts = self._counts.get(model)
        if not counts:
            return {}
        total = sum(counts.values())
        return {dep: n / total for dep, n in counts.items()}

    def total(self, model: str) -> int:
        recent = self._recent.get(model)
        return 0 if recent is None else len(recent)
