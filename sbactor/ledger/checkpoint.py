"""Signed checkpoints: (seq, head hash, time) records that make tail truncation detectable.

A hash chain proves nothing about entries deleted from its end; a signed checkpoint naming the
head at seq N does. Pure: encoding, signing and checking only.
"""

from __future__ import annotations

import json
import re
from typing import Any

import attrs

from sbactor.ledger.chain import PublicKey, SigningKey, lp_digest

CHECKPOINT_DOMAIN = b"sbactor.ledger.checkpoint.v1"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_FIELDS = frozenset({"seq", "head_hash", "checkpoint_at", "kid", "signature"})


@attrs.frozen
class Checkpoint:
    seq: int
    head_hash: str
    checkpoint_at: str
    kid: str | None = None
    signature: str | None = None


def checkpoint_digest(seq: int, head_hash: str, checkpoint_at: str) -> bytes:
    """SHA-256 over length-prefixed domain, seq, head hash and time (a different domain than
    entries, so a checkpoint signature can never pass as an entry signature)."""
    return lp_digest(
        CHECKPOINT_DOMAIN,
        str(seq).encode("ascii"),
        head_hash.encode("ascii"),
        checkpoint_at.encode("utf-8"),
    )


def make_checkpoint(
    seq: int, head_hash: str, checkpoint_at: str, signer: SigningKey | None = None
) -> Checkpoint:
    if signer is None:
        return Checkpoint(seq, head_hash, checkpoint_at)
    signature = signer.sign(checkpoint_digest(seq, head_hash, checkpoint_at))
    return Checkpoint(seq, head_hash, checkpoint_at, signer.kid, signature)


def encode_checkpoint(cp: Checkpoint) -> bytes:
    record: dict[str, Any] = {
        "seq": cp.seq,
        "head_hash": cp.head_hash,
        "checkpoint_at": cp.checkpoint_at,
    }
    if cp.signature is not None:
        record["kid"] = cp.kid
        record["signature"] = cp.signature
    return json.dumps(record, separators=(",", ":")).encode("utf-8") + b"\n"


def decode_checkpoint(line: bytes) -> Checkpoint:
    """Parse one checkpoint line; ValueError with a short reason when malformed."""
    try:
        raw = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        raise ValueError("not valid JSON") from None
    if not isinstance(raw, dict) or set(raw) - _FIELDS:
        raise ValueError("not a checkpoint record")
    seq, head, at = raw.get("seq"), raw.get("head_hash"), raw.get("checkpoint_at")
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
        raise ValueError("seq is missing or invalid")
    if not isinstance(head, str) or not _HEX64.match(head):
        raise ValueError("head_hash is missing or invalid")
    if not isinstance(at, str):
        raise ValueError("checkpoint_at is missing")
    kid, signature = raw.get("kid"), raw.get("signature")
    if not isinstance(kid, str | None) or not isinstance(signature, str | None):
        raise ValueError("kid/signature must be strings")
    if (kid is None) != (signature is None):
        raise ValueError("kid and signature must both be present or both absent")
    return Checkpoint(seq, head, at, kid, signature)


def checkpoint_problem(cp: Checkpoint, public_key: PublicKey | None) -> str | None:
    """Why this checkpoint's signature is unacceptable under ``public_key``; None if fine."""
    if public_key is None:
        return None
    if cp.signature is None:
        return f"checkpoint at seq {cp.seq} is not signed but a public key was given"
    if cp.kid != public_key.kid:
        return f"checkpoint at seq {cp.seq} signed by key {cp.kid}, not by {public_key.kid}"
    if not public_key.verifies(checkpoint_digest(cp.seq, cp.head_hash, cp.checkpoint_at),
                               cp.signature):
        return f"checkpoint at seq {cp.seq} has a bad signature (forged or altered)"
    return None
