"""Which budget counters a request falls in.

A budget without ``match`` gives every value of its scope its own counter (``team`` budget →
one counter per team); with ``match`` one counter is shared by all matching values (exact or a
shell-style glob). ``global`` has a single counter; ``tag`` may match several tags of a request.
"""

from __future__ import annotations

from collections.abc import Sequence
from fnmatch import fnmatchcase
from typing import NamedTuple

import attrs

from sbactor.budget.config import BudgetConfig, RateLimitConfig

GLOBAL_VALUE = "*"


@attrs.frozen
class RequestScopes:
    """Who and what a request is about (from the virtual key and the body)."""

    key_id: str | None = None
    user: str | None = None
    team: str | None = None
    model: str | None = None
    tags: tuple[str, ...] = ()

    def values(self, scope: str) -> tuple[str, ...]:
        if scope == "global":
            return (GLOBAL_VALUE,)
        if scope == "tag":
            return tuple(dict.fromkeys(self.tags))
        value = {"key": self.key_id, "user": self.user, "team": self.team, "model": self.model}[
            scope
        ]
        return () if value is None else (value,)


class CounterId(NamedTuple):
    """One counter: a budget (by label) and the scope value it counts for (a tuple: hot key)."""

    budget: str
    value: str

    def describe(self, scope: str) -> str:
        return self.budget if scope == "global" else f"{self.budget} [{scope}={self.value}]"


def _matching(scope: str, match: str | None, scopes: RequestScopes) -> tuple[str, ...]:
    values = scopes.values(scope)
    if match is None:
        return values
    return (match,) if any(fnmatchcase(v, match) for v in values) else ()


def counters_for(budgets: Sequence[BudgetConfig], scopes: RequestScopes) -> list[tuple[int, str]]:
    """(budget index, counter value) for every budget counter the request falls in."""
    out: list[tuple[int, str]] = []
    for i, budget in enumerate(budgets):
        out.extend((i, v) for v in _matching(budget.scope, budget.match, scopes))
    return out


def rate_counters_for(
    limits: Sequence[RateLimitConfig], scopes: RequestScopes
) -> list[tuple[int, str]]:
    out: list[tuple[int, str]] = []
    for i, limit in enumerate(limits):
        out.extend((i, v) for v in _matching(limit.scope, limit.match, scopes))
    return out


def unique_labels(labels: Sequence[str]) -> list[str]:
    """Make budget labels unique (``team/day``, ``team/day#2``) so counters never collide."""
    seen: dict[str, int] = {}
    out = []
    for label in labels:
        n = seen.get(label, 0) + 1
        seen[label] = n
        out.append(label if n == 1 else f"{label}#{n}")
    return out
