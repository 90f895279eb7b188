"""The bytes of the hash chain: canonical JSON, entry hashes, Ed25519 keys and entry lines.

Pure (no I/O, no trio) so the writer, startup replay and ``sbactor ledger verify`` share exactly
one definition of every byte; docs/ledger.md describes the same bytes for third parties.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import re
from collections.abc import Mapping
from typing import Any

import attrs
import nacl.exceptions
import nacl.signing

GENESIS_HASH = "0" * 64
ENTRY_DOMAIN = b"sbactor.ledger.entry.v1"
ENTRY_FIELDS = frozenset(
    {"seq", "recorded_at", "prev_hash", "entry_hash", "kid", "signature", "event"}
)
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_HEX128 = re.compile(r"^[0-9a-f]{128}$")


class ChainError(Exception):
    """The chain is broken at ``seq``; ``reason`` says how (one line, for humans)."""

    def __init__(self, seq: int, reason: str) -> None:
        super().__init__(f"seq {seq}: {reason}")
        self.seq = seq
        self.reason = reason


# ---- canonical JSON ---------------------------------------------------------------------------


def canonical_json(value: Any) -> bytes:
    """Sorted keys, no whitespace, UTF-8 (not ASCII-escaped); NaN/Infinity are refused."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def normalize_event(value: Any) -> Any:
    """Make an event JSON-clean so hashing it can never fail and re-parsing gives equal bytes.

    Keys become strings (so sorting is by code point), tuples become lists, non-finite floats
    become null, lone surrogates become U+FFFD and unknown objects their ``str()``.

    Every ledger entry goes through this, so the exact built-in types (all an event holds in
    practice) take a fast path — ASCII strings need no surrogate check; anything else goes to
    the general version below, which defines the result.
    """
    tp = type(value)
    if tp is str:
        return value if value.isascii() else _normalize_general(value)
    if tp is dict:
        return {
            (k if type(k) is str and k.isascii() else _normalize_general(str(k))): (
                normalize_event(v)
            )
            for k, v in value.items()
        }
    if value is None or tp is bool or tp is int:
        return value
    if tp is float:
        return value if math.isfinite(value) else None
    if tp is list or tp is tuple:
        return [normalize_event(v) for v in value]
    return _normalize_general(value)


def _normalize_general(value: Any) -> Any:
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return value.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {_normalize_general(str(k)): _normalize_general(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_normalize_general(v) for v in value]
    return _normalize_general(str(value))


_second_cache: list[Any] = [None, ""]  # [whole second, its "YYYY-MM-DDTHH:MM:SS" prefix]


def rfc3339(timestamp: float) -> str:
    """UTC, microseconds, ``Z`` suffix: fixed width so the bytes never vary by locale.

    Every usage event and ledger entry is stamped, so the date part is formatted once per
    second and only the microseconds per call (strftime per call was ~1 % of gateway CPU).
    """
    second = math.floor(timestamp)
    micros = min(999_999, round((timestamp - second) * 1_000_000))
    if _second_cache[0] != second:
        moment = dt.datetime.fromtimestamp(second, tz=dt.UTC)
        _second_cache[0], _second_cache[1] = second, moment.strftime("%Y-%m-%dT%H:%M:%S")
    return f"{_second_cache[1]}.{micros:06d}Z"


# ---- hashing ----------------------------------------------------------------------------------


def _lp(data: bytes) -> bytes:
    """Length prefix: 8-byte big-endian length, then the bytes (fields cannot bleed)."""
    return len(data).to_bytes(8, "big") + data


def entry_digest(prev_hash: str, seq: int, recorded_at: str, event_json: bytes) -> bytes:
    """SHA-256 over domain, prev_hash, seq, recorded_at and the event's canonical JSON."""
    material = b"".join(
        (
            _lp(ENTRY_DOMAIN),
            _lp(prev_hash.encode("ascii")),
            _lp(str(seq).encode("ascii")),
            _lp(recorded_at.encode("utf-8")),
            _lp(event_json),
        )
    )
    return hashlib.sha256(material).digest()


def lp_digest(*fields: bytes) -> bytes:
    """SHA-256 of length-prefixed fields (used for checkpoints, see checkpoint.py)."""
    return hashlib.sha256(b"".join(_lp(f) for f in fields)).digest()


# ---- keys -------------------------------------------------------------------------------------


def kid_for(public_key: bytes) -> str:
    """Key id: the first 16 hex characters of SHA-256 of the raw 32-byte public key."""
    return hashlib.sha256(public_key).hexdigest()[:16]


def _parse_hex32(text: str, what: str) -> bytes:
    cleaned = text.strip().lower()
    if len(cleaned) != 64:
        raise ValueError(f"{what} must be 64 hex characters (32 bytes); got {len(cleaned)}")
    if not re.fullmatch(r"[0-9a-f]{64}", cleaned):
        raise ValueError(f"{what} is not valid hex")
    return bytes.fromhex(cleaned)


@attrs.frozen
class PublicKey:
    """An Ed25519 verify key with its kid; all ``ledger verify`` needs."""

    key: nacl.signing.VerifyKey

    @classmethod
    def from_hex(cls, text: str) -> PublicKey:
        raw = _parse_hex32(text, "public key")
        try:
            return cls(nacl.signing.VerifyKey(raw))
        except (nacl.exceptions.CryptoError, ValueError, TypeError) as exc:
            raise ValueError(f"public key is not a valid Ed25519 key: {exc}") from None

    @property
    def hex(self) -> str:
        return bytes(self.key).hex()

    @property
    def kid(self) -> str:
        return kid_for(bytes(self.key))

    def verifies(self, message: bytes, signature_hex: str) -> bool:
        if not _HEX128.match(signature_hex):
            return False
        try:
            self.key.verify(message, bytes.fromhex(signature_hex))
        except nacl.exceptions.BadSignatureError:
            return False
        return True


@attrs.frozen
class SigningKey:
    """An Ed25519 signing key built from a 32-byte seed (hex in config or env)."""

    key: nacl.signing.SigningKey

    @classmethod
    def from_seed_hex(cls, text: str) -> SigningKey:
        return cls(nacl.signing.SigningKey(_parse_hex32(text, "signing seed")))

    @classmethod
    def generate(cls) -> SigningKey:
        return cls(nacl.signing.SigningKey.generate())

    @property
    def seed_hex(self) -> str:
        return bytes(self.key).hex()

    @property
    def public(self) -> PublicKey:
        return PublicKey(self.key.verify_key)

    @property
    def kid(self) -> str:
        return kid_for(bytes(self.key.verify_key))

    def sign(self, message: bytes) -> str:
        return self.key.sign(message).signature.hex()


# ---- entries ----------------------------------------------------------------------------------


@attrs.frozen
class Entry:
    seq: int
    recorded_at: str
    prev_hash: str
    entry_hash: str
    kid: str | None
    signature: str | None
    event: dict[str, Any]


def make_entry(
    prev_hash: str,
    seq: int,
    recorded_at: str,
    event: dict[str, Any],
    signer: SigningKey | None = None,
) -> tuple[Entry, bytes]:
    """Build the next entry (``event`` must already be normalized) and its JSONL line."""
    event_json = canonical_json(event)
    digest = entry_digest(prev_hash, seq, recorded_at, event_json)
    kid = signer.kid if signer else None
    signature = signer.sign(digest) if signer else None
    entry = Entry(seq, recorded_at, prev_hash, digest.hex(), kid, signature, event)
    return entry, _line(entry, event_json)


def _line(entry: Entry, event_json: bytes) -> bytes:
    recorded_at = json.dumps(entry.recorded_at, ensure_ascii=False)
    head = (
        f'{{"seq":{entry.seq},"recorded_at":{recorded_at},'
        f'"prev_hash":"{entry.prev_hash}","entry_hash":"{entry.entry_hash}"'
    )
    if entry.signature is not None:
        head += f',"kid":{json.dumps(entry.kid)},"signature":"{entry.signature}"'
    return head.encode("utf-8") + b',"event":' + event_json + b"}\n"


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def decode_entry(line: bytes, expected_seq: int) -> tuple[Entry, bytes]:
    """Parse one line (without its newline) into an Entry plus the event's canonical JSON."""
    try:
        raw = json.loads(line, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError):
        raise ChainError(expected_seq, "line is not valid JSON") from None
    if not isinstance(raw, dict):
        raise ChainError(expected_seq, "line is not a JSON object")
    unknown = set(raw) - ENTRY_FIELDS
    if unknown:
        raise ChainError(expected_seq, f"unexpected field(s) {sorted(unknown)}")
    seq = raw.get("seq")
    if not isinstance(seq, int) or isinstance(seq, bool):
        raise ChainError(expected_seq, "seq is missing or not an integer")
    for name in ("prev_hash", "entry_hash"):
        value = raw.get(name)
        if not isinstance(value, str) or not _HEX64.match(value):
            raise ChainError(seq, f"{name} is missing or not 64 lowercase hex characters")
    recorded_at = raw.get("recorded_at")
    if not isinstance(recorded_at, str):
        raise ChainError(seq, "recorded_at is missing or not a string")
    kid, signature = raw.get("kid"), raw.get("signature")
    if (kid is None) != (signature is None) or not isinstance(kid, str | None):
        raise ChainError(seq, "kid and signature must both be present (strings) or both absent")
    if not isinstance(signature, str | None):
        raise ChainError(seq, "signature is not a string")
    event = raw.get("event")
    if not isinstance(event, dict):
        raise ChainError(seq, "event is missing or not a JSON object")
    try:
        event_json = canonical_json(event)
    except ValueError:
        raise ChainError(seq, "event cannot be canonically encoded") from None
    entry = Entry(seq, recorded_at, raw["prev_hash"], raw["entry_hash"], kid, signature, event)
    return entry, event_json


@attrs.define
class ChainChecker:
    """Checks entries one line at a time; keeps the head so files can be streamed."""

    public_key: PublicKey | None = None
    next_seq: int = 0
    head_hash: str = GENESIS_HASH
    signed: bool | None = None
    kid: str | None = None
    signatures_checked: int = 0

    def check(self, line: bytes) -> Entry:
        """Verify one line (no trailing newline) as the next entry, or raise ChainError."""
        expected = self.next_seq
        entry, event_json = decode_entry(line, expected)
        if entry.seq != expected:
            how = "entries missing" if entry.seq > expected else "out of order or duplicated"
            raise ChainError(expected, f"expected seq {expected}, found seq {entry.seq} ({how})")
        if entry.prev_hash != self.head_hash:
            raise ChainError(expected, "prev_hash does not match the previous entry's hash")
        digest = entry_digest(entry.prev_hash, entry.seq, entry.recorded_at, event_json)
        if digest.hex() != entry.entry_hash:
            raise ChainError(expected, "entry_hash does not match the entry's contents (edited)")
        self._check_signature(entry, digest)
        if _line(entry, event_json) != line + b"\n":
            raise ChainError(expected, "line is not in canonical form (re-encoded or edited)")
        self.next_seq = expected + 1
        self.head_hash = entry.entry_hash
        return entry

    def _check_signature(self, entry: Entry, digest: bytes) -> None:
        seq, is_signed = entry.seq, entry.signature is not None
        if self.signed is None:
            self.signed, self.kid = is_signed, entry.kid
        elif self.signed and not is_signed:
            raise ChainError(seq, "unsigned entry in a signed ledger")
        elif not self.signed and is_signed:
            raise ChainError(seq, "signed entry in an unsigned ledger")
        elif entry.kid != self.kid:
            raise ChainError(seq, f"key id changed from {self.kid} to {entry.kid}")
        if self.public_key is None:
            return
        if not is_signed:
            raise ChainError(seq, "entry is not signed but a public key was given")
        if entry.kid != self.public_key.kid:
            raise ChainError(
                seq, f"entry signed by key {entry.kid}, not by the given key {self.public_key.kid}"
            )
        assert entry.signature is not None
        if not self.public_key.verifies(digest, entry.signature):
            raise ChainError(seq, "signature does not verify (forged or altered)")
        self.signatures_checked += 1


def dedup_key(event: Mapping[str, Any]) -> str | None:
    """The exactly-once key: ``dedup_key`` when present, else ``request_id``, else none."""
    key = event.get("dedup_key") or event.get("request_id")
    return None if key is None or key == "" else str(key)
