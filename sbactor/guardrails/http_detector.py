"""The external classifier: one POST per prompt, bounded by its own timeout.

Accepted answers: ``{"flagged": bool, "labels"?: [...], "score"?: float}`` or the OpenAI
moderation shape
``{"results": [{"flagged": bool, "categories": {...}, "category_scores": {...}}]}``.
Anything else is an ``error`` verdict, never an exception out of the mesh.
"""

from __future__ import annotations

from typing import Any

import httpx2
import trio

from sbactor.guardrails.config import HttpDetectorConfig
from sbactor.guardrails.verdict import Verdict, failed, ok

KIND = "http"


def parse_moderation(name: str, cfg: HttpDetectorConfig, body: Any) -> Verdict:
    """Pure: turn a classifier's JSON answer into a verdict."""
    if isinstance(body, dict) and isinstance(body.get("results"), list) and body["results"]:
        first = body["results"][0]
        if isinstance(first, dict) and isinstance(first.get("flagged"), bool):
            categories = first.get("categories") or {}
            scores = first.get("category_scores") or {}
            labels = tuple(sorted(k for k, v in categories.items() if v is True))
            score = max(
                (float(v) for v in scores.values() if isinstance(v, int | float)),
                default=1.0 if first["flagged"] else 0.0,
            )
            return ok(
                name, KIND, flagged=first["flagged"], score=score, labels=labels or (cfg.label,)
            )
    if isinstance(body, dict) and isinstance(body.get("flagged"), bool):
        raw_labels = body.get("labels") or []
        if not isinstance(raw_labels, list) or not all(isinstance(x, str) for x in raw_labels):
            return failed(name, KIND, "classifier 'labels' is not a list of strings")
        raw_score = body.get("score")
        if raw_score is not None and not isinstance(raw_score, int | float):
            return failed(name, KIND, "classifier 'score' is not a number")
        flagged = body["flagged"]
        score = float(raw_score) if raw_score is not None else (1.0 if flagged else 0.0)
        return ok(
            name, KIND, flagged=flagged, score=score, labels=tuple(raw_labels) or (cfg.label,)
        )
    return failed(name, KIND, "classifier answer has no boolean 'flagged'")


async def classify(
    name: str, cfg: HttpDetectorConfig, text: str, http: httpx2.AsyncClient | None
) -> Verdict:
    """POST ``{"input": text}``; a slow, failing or malformed classifier gives an error verdict."""
    timeout = cfg.timeout_ms / 1000
    try:
        with trio.fail_after(timeout):
            if http is None:
                async with httpx2.AsyncClient(timeout=timeout) as client:
                    response = await client.post(cfg.url, json={"input": text}, headers=cfg.headers)
            else:
                response = await http.post(
                    cfg.url, json={"input": text}, headers=cfg.headers, timeout=timeout
                )
    except trio.TooSlowError:
        return failed(name, KIND, f"classifier did not answer within {cfg.timeout_ms} ms")
    except httpx2.TimeoutException:
        return failed(name, KIND, f"classifier did not answer within {cfg.timeout_ms} ms")
    except httpx2.HTTPError as exc:
        return failed(name, KIND, f"classifier unreachable: {type(exc).__name__}: {exc}")
    if response.status_code != 200:
        return failed(name, KIND, f"classifier answered HTTP {response.status_code}")
    try:
        body = response.json()
    except ValueError:
        return failed(name, KIND, "classifier answer is not JSON")
    return parse_moderation(name, cfg, body)
