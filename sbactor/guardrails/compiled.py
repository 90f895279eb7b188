"""Guardrails compiled once at config load: detectors, mesh settings and the config fingerprint.

The fingerprint hashes the *full* detector and mesh configuration, and is part of every cache key,
so two configs never share a cached verdict.
"""

from __future__ import annotations

import hashlib
import json
import unicodedata
from collections.abc import Sequence

import attrs

from sbactor.guardrails.config import GuardrailsConfig, MeshConfig
from sbactor.guardrails.detectors import AsyncDetector, CheapDetector, Detector, build_detector

# Bump when built-in detection rules change, so old fingerprints (and verdicts) are not reused.
RULES_VERSION = "1"
TEXT_SEPARATOR = "\n\n"


def fingerprint_of(cfg: GuardrailsConfig) -> str:
    data = {"rules": RULES_VERSION, "config": attrs.asdict(cfg)}
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def normalize(text: str) -> str:
    """Unicode NFC, so visually identical prompts share a cache entry and a verdict."""
    return text if unicodedata.is_normalized("NFC", text) else unicodedata.normalize("NFC", text)


def scan_text(texts: Sequence[str]) -> str:
    """The one text the detectors see: the normalized message texts, blank-line separated."""
    return TEXT_SEPARATOR.join(normalize(t) for t in texts)


@attrs.frozen
class CompiledGuardrails:
    detectors: tuple[Detector, ...]
    mesh: MeshConfig | None
    fingerprint: str

    @classmethod
    def from_config(cls, cfg: GuardrailsConfig | None) -> CompiledGuardrails:
        if cfg is None:
            cfg = GuardrailsConfig()
        detectors = tuple(build_detector(d) for d in cfg.input)
        return cls(detectors=detectors, mesh=cfg.mesh, fingerprint=fingerprint_of(cfg))

    @property
    def enabled(self) -> bool:
        return bool(self.detectors)

    @property
    def cheap(self) -> tuple[CheapDetector, ...]:
        return tuple(d for d in self.detectors if isinstance(d, CheapDetector))

    @property
    def expensive(self) -> tuple[AsyncDetector, ...]:
        return tuple(d for d in self.detectors if not isinstance(d, CheapDetector))

    @property
    def redacting(self) -> tuple[Detector, ...]:
        return tuple(d for d in self.detectors if d.redacts)
