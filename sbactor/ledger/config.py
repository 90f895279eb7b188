"""Config of the verifiable usage ledger sink (``usage_sinks: [{type: ledger, ...}]``)."""

from __future__ import annotations

import re
from typing import Any, Literal

import attrs

_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")


def _seed(_inst: Any, _attr: Any, value: str | None) -> None:
    if value is None:
        return
    if not isinstance(value, str) or not _HEX64.match(value.strip()):
        got = len(value.strip()) if isinstance(value, str) else type(value).__name__
        raise ValueError(
            f"must be 64 hex characters (a 32-byte Ed25519 seed; `sbactor ledger keygen` makes"
            f" one), got {got}"
        )


def _at_least(minimum: float) -> Any:
    def check(_inst: Any, attr: attrs.Attribute[Any], value: float) -> None:
        if isinstance(value, bool) or value < minimum:
            raise ValueError(f"must be >= {minimum}, got {value}")

    return check


def _one_of(*choices: str) -> Any:
    def check(_inst: Any, _attr: Any, value: str) -> None:
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}; got {value!r}")

    return check


@attrs.frozen
class LedgerSinkConfig:
    """Where and how usage events become a hash-chained, optionally signed JSONL ledger."""

    type: Literal["ledger"] = attrs.field(default="ledger", validator=_one_of("ledger"))
    #: a directory of segments; relative paths are resolved against the data dir by the loader
    path: str = "ledger"
    #: 32-byte Ed25519 seed, hex; None writes an unsigned (still hash-chained) ledger
    signing_seed_hex: str | None = attrs.field(default=None, validator=_seed)
    #: bounded mailbox of the LedgerWriter actor
    mailbox: int = attrs.field(default=1024, validator=_at_least(1))
    #: mailbox full: wait (backpressure) or refuse new requests with 503 (shed)
    on_full: Literal["backpressure", "shed"] = attrs.field(
        default="backpressure", validator=_one_of("backpressure", "shed")
    )
    #: group commit: events written (and fsynced) together
    batch_size: int = attrs.field(default=256, validator=_at_least(1))
    fsync: Literal["always", "batch", "never"] = attrs.field(
        default="batch", validator=_one_of("always", "batch", "never")
    )
    #: strict: a response completes only once its entry is durable
    durability: Literal["strict", "batch"] = attrs.field(
        default="batch", validator=_one_of("strict", "batch")
    )
    #: with durability batch: after a batch's first event, wait this long for more before
    #: writing and fsyncing them together (fewer fsyncs under load; strict ignores it)
    batch_window_ms: float = attrs.field(default=20.0, validator=_at_least(0.0))
    checkpoint_every: int = attrs.field(default=1000, validator=_at_least(1))
    checkpoint_interval_s: float = attrs.field(default=10.0, validator=_at_least(0.001))
    segment_max_bytes: int = attrs.field(default=64 * 1024 * 1024, validator=_at_least(1024))
    #: request ids remembered for exactly-once (most recent N; older ones may be re-recorded)
    dedup_capacity: int = attrs.field(default=100_000, validator=_at_least(1))
    #: strict durability: how long a request waits for its entry to become durable
    strict_timeout_s: float = attrs.field(default=30.0, validator=_at_least(0.001))

    def __attrs_post_init__(self) -> None:
        if self.durability == "strict" and self.fsync == "never":
            raise ValueError("durability: strict needs fsync: always or batch (not never)")
