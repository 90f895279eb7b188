"""What one detector says about one prompt.

A verdict is data, never an exception: a detector that timed out or failed still produces a
verdict (``status`` says so) so the mesh can account for it instead of silently missing it.
"""

from __future__ import annotations

from typing import Any, Literal

import attrs

Status = Literal["ok", "timed_out", "error"]
Cost = Literal["cheap", "expensive"]


@attrs.frozen
class Span:
    """A match: ``text[start:end]`` is an ``entity`` (``EMAIL``, ``API_KEY``…)."""

    start: int
    end: int
    entity: str


@attrs.frozen
class Verdict:
    detector: str
    kind: str
    flagged: bool
    score: float = 0.0
    labels: tuple[str, ...] = ()
    spans: tuple[Span, ...] = ()
    status: Status = "ok"
    error: str | None = None

    @property
    def label(self) -> str:
        """The primary label (first one raised, else the detector kind)."""
        return self.labels[0] if self.labels else self.kind

    @property
    def entities(self) -> tuple[str, ...]:
        return tuple(sorted({s.entity for s in self.spans}))

    def as_dict(self) -> dict[str, Any]:
        """The shape shown to the policy plane and written to the usage event (no content)."""
        data: dict[str, Any] = {
            "detector": self.detector,
            "kind": self.kind,
            "label": self.label,
            "labels": list(self.labels),
            "flagged": self.flagged,
            "score": round(self.score, 4),
            "status": self.status,
            "entities": list(self.entities),
        }
        if self.error is not None:
            data["error"] = self.error
        return data


def ok(
    detector: str,
    kind: str,
    *,
    flagged: bool,
    score: float,
    labels: tuple[str, ...] = (),
    spans: tuple[Span, ...] = (),
) -> Verdict:
    return Verdict(detector, kind, flagged, score, labels if flagged else (), spans)


def timed_out(detector: str, kind: str, budget_ms: float) -> Verdict:
    return Verdict(
        detector,
        kind,
        False,
        0.0,
        status="timed_out",
        error=f"no verdict within the {budget_ms:g} ms latency budget",
    )


def failed(detector: str, kind: str, error: str) -> Verdict:
    return Verdict(detector, kind, False, 0.0, status="error", error=error)
