"""The guardrail mesh: detectors, quorum fusion, cached verdicts, redaction.

``evaluate`` lives in ``sbactor.guardrails.mesh`` (it depends on the VerdictCache actor, which
depends on this package); it is re-exported lazily here to keep the import graph acyclic.
"""

from typing import Any

from sbactor.guardrails.compiled import CompiledGuardrails
from sbactor.guardrails.config import (
    DenylistConfig,
    DetectorConfig,
    GuardrailsConfig,
    HttpDetectorConfig,
    LengthConfig,
    MeshConfig,
    PiiConfig,
    PromptInjectionConfig,
    RegexConfig,
    RegexPattern,
    SecretsConfig,
)
from sbactor.guardrails.fusion import GuardrailResult, decide, fuse
from sbactor.guardrails.redaction import message_texts, redact_messages, redact_text, redact_texts
from sbactor.guardrails.verdict import Span, Verdict

__all__ = [
    "CompiledGuardrails",
    "DenylistConfig",
    "DetectorConfig",
    "GuardrailResult",
    "GuardrailsConfig",
    "HttpDetectorConfig",
    "LengthConfig",
    "MeshConfig",
    "PiiConfig",
    "PromptInjectionConfig",
    "RegexConfig",
    "RegexPattern",
    "SecretsConfig",
    "Span",
    "Verdict",
    "decide",
    "evaluate",
    "fuse",
    "message_texts",
    "redact_messages",
    "redact_text",
    "redact_texts",
]


def __getattr__(name: str) -> Any:
    if name == "evaluate":
        from sbactor.guardrails.mesh import evaluate

        return evaluate
    raise AttributeError(f"module 'sbactor.guardrails' has no attribute {name!r}")
