"""Fusing the full verdict set into one action, and the result the gateway acts on.

The rule is a pure function of the verdicts and the mesh config, so it is table-tested:
flags >= block_threshold (> 0) blocks; otherwise any flag with ``redact_on_flag`` redacts;
otherwise the request passes. A detector that timed out or failed counts as a flag only under
``fail_closed``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import attrs

from sbactor.guardrails.config import MeshConfig
from sbactor.guardrails.verdict import Verdict

Action = Literal["pass", "redact", "block"]
Mode = Literal["mesh", "simple"]


def counts_as_flag(verdict: Verdict, on_detector_error: str) -> bool:
    if verdict.status == "ok":
        return verdict.flagged
    return on_detector_error == "fail_closed"


def flag_count(verdicts: Sequence[Verdict], mesh: MeshConfig) -> int:
    return sum(counts_as_flag(v, mesh.on_detector_error) for v in verdicts)


def decide(flags: int, mesh: MeshConfig) -> Action:
    """The fusion table: a function of the flag count and the mesh config only."""
    if mesh.block_threshold > 0 and flags >= mesh.block_threshold:
        return "block"
    if flags > 0 and mesh.redact_on_flag:
        return "redact"
    return "pass"


def fuse(verdicts: Sequence[Verdict], mesh: MeshConfig) -> Action:
    return decide(flag_count(verdicts, mesh), mesh)


def fused_labels(verdicts: Sequence[Verdict], on_detector_error: str) -> tuple[str, ...]:
    labels: set[str] = set()
    for v in verdicts:
        if v.status == "ok" and v.flagged:
            labels.update(v.labels or (v.kind,))
        elif v.status != "ok" and on_detector_error == "fail_closed":
            labels.add(f"{v.detector}_{v.status}")
    return tuple(sorted(labels))


@attrs.frozen
class GuardrailResult:
    """What the mesh decided and why; safe to cache, log and sign (holds no prompt text)."""

    action: Action
    flagged_count: int
    labels: tuple[str, ...]
    verdicts: tuple[Verdict, ...]
    timed_out: tuple[str, ...] = ()
    cached: bool = False
    mode: Mode = "mesh"
    elapsed_ms: float = 0.0

    @property
    def flagged(self) -> bool:
        return self.flagged_count > 0

    @property
    def errored(self) -> tuple[str, ...]:
        return tuple(v.detector for v in self.verdicts if v.status == "error")

    @property
    def complete(self) -> bool:
        """Every detector answered: only complete results may be cached."""
        return all(v.status == "ok" for v in self.verdicts)

    @property
    def entities(self) -> tuple[str, ...]:
        return tuple(sorted({e for v in self.verdicts for e in v.entities}))

    def as_activation(self) -> dict[str, Any]:
        """``ai.guardrails`` for the CEL policy plane."""
        return {
            "action": self.action,
            "flagged": self.flagged,
            "flagged_count": self.flagged_count,
            "labels": list(self.labels),
            "entities": list(self.entities),
            "timed_out": list(self.timed_out),
            "mode": self.mode,
            "cached": self.cached,
            "verdicts": [
                {
                    "detector": v.detector,
                    "label": v.label,
                    "flagged": v.flagged,
                    "score": round(v.score, 4),
                    "status": v.status,
                }
                for v in self.verdicts
            ],
        }

    def as_event(self) -> dict[str, Any]:
        """``guardrails`` in the usage event / ledger entry."""
        return {
            "action": self.action,
            "mode": self.mode,
            "flagged_count": self.flagged_count,
            "labels": list(self.labels),
            "entities": list(self.entities),
            "timed_out": list(self.timed_out),
            "errored": list(self.errored),
            "cached": self.cached,
            "elapsed_ms": round(self.elapsed_ms, 3),
            "verdicts": [v.as_dict() for v in self.verdicts],
        }

    def as_error(self) -> dict[str, Any]:
        """The OpenAI-shaped 400 body for a block."""
        labels = ",".join(self.labels) or "guardrail"
        return {
            "error": {
                "message": (
                    f"Request blocked by guardrails: {self.flagged_count} detector(s) flagged "
                    f"the input ({labels})."
                ),
                "type": "guardrail_violation",
                "code": labels,
                "param": None,
            }
        }


EMPTY = GuardrailResult(action="pass", flagged_count=0, labels=(), verdicts=())
