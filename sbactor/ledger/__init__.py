"""The verifiable usage ledger: hash chain, signatures, checkpoints, verify (pure/sync parts)."""

from sbactor.ledger.chain import GENESIS_HASH, ChainChecker, ChainError, PublicKey, SigningKey
from sbactor.ledger.config import LedgerSinkConfig
from sbactor.ledger.verify import (
    LedgerCorrupt,
    LedgerOperationalError,
    ReplayResult,
    VerifyReport,
    replay,
    verify,
)

__all__ = [
    "GENESIS_HASH",
    "ChainChecker",
    "ChainError",
    "LedgerCorrupt",
    "LedgerOperationalError",
    "LedgerSinkConfig",
    "PublicKey",
    "ReplayResult",
    "SigningKey",
    "VerifyReport",
    "replay",
    "verify",
]
