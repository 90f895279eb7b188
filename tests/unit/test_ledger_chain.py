"""Pure core: canonical bytes, entry hash encoding, keys, checkpoints, the chain checker."""

from __future__ import annotations

import hashlib

import pytest

from sbactor.ledger.chain import (
    GENESIS_HASH,
    ChainChecker,
    ChainError,
    PublicKey,
    SigningKey,
    canonical_json,
    dedup_key,
    entry_digest,
    kid_for,
    make_entry,
    normalize_event,
    rfc3339,
)
from sbactor.ledger.checkpoint import (
    checkpoint_problem,
    decode_checkpoint,
    encode_checkpoint,
    make_checkpoint,
)
from sbactor.ledger.config import LedgerSinkConfig

SEED = "11" * 32


def test_canonical_json_sorted_compact_utf8() -> None:
    assert canonical_json({"b": 1, "a": [1, 2.5, None, True], "é": "ü"}) == (
        '{"a":[1,2.5,null,true],"b":1,"é":"ü"}'.encode()
    )
    with pytest.raises(ValueError):
        canonical_json({"x": float("nan")})


def test_normalize_makes_everything_hashable_and_stable() -> None:
    event = normalize_event({2: "two", 10: (1, float("inf")), "s": "bad\udc80", "o": object})
    assert event["2"] == "two" and event["10"] == [1, None]
    assert event["s"] == "bad\ufffd"
    canonical_json(event)  # never raises after normalize
    assert normalize_event(event) == event


def test_entry_digest_matches_documented_encoding() -> None:
    """The exact bytes from docs/ledger.md, re-implemented independently here."""

    def lp(b: bytes) -> bytes:
        return len(b).to_bytes(8, "big") + b

    event_json = b'{"a":1}'
    material = (
        lp(b"sbactor.ledger.entry.v1") + lp(GENESIS_HASH.encode()) + lp(b"0")
        + lp(b"2024-01-01T00:00:00.000000Z") + lp(event_json)
    )
    expected = hashlib.sha256(material).digest()
    assert entry_digest(GENESIS_HASH, 0, "2024-01-01T00:00:00.000000Z", event_json) == expected


def test_rfc3339_is_utc_fixed_width() -> None:
    assert rfc3339(0.5) == "1970-01-01T00:00:00.500000Z"


def test_keys_kid_and_parse_errors() -> None:
    key = SigningKey.from_seed_hex(SEED)
    assert key.kid == kid_for(bytes.fromhex(key.public.hex)) and len(key.kid) == 16
    assert PublicKey.from_hex(key.public.hex).kid == key.kid
    with pytest.raises(ValueError, match="64 hex characters"):
        SigningKey.from_seed_hex("abcd")
    with pytest.raises(ValueError, match="not valid hex"):
        PublicKey.from_hex("zz" * 32)


def _chain(n: int, signer: SigningKey | None) -> list[bytes]:
    lines, head = [], GENESIS_HASH
    for seq in range(n):
        entry, line = make_entry(head, seq, rfc3339(1000.0 + seq), {"request_id": f"r{seq}"},
                                 signer)
        lines.append(line[:-1])
        head = entry.entry_hash
    return lines


def test_checker_accepts_a_good_chain_and_counts_signatures() -> None:
    key = SigningKey.from_seed_hex(SEED)
    checker = ChainChecker(public_key=key.public)
    for line in _chain(5, key):
        checker.check(line)
    assert checker.next_seq == 5 and checker.signatures_checked == 5 and checker.signed


def test_checker_rejects_non_canonical_line() -> None:
    line = _chain(1, None)[0].replace(b'"event":{', b'"event": {')
    with pytest.raises(ChainError, match="canonical form"):
        ChainChecker().check(line)


def test_checker_rejects_duplicate_key_trick() -> None:
    line = _chain(1, None)[0].replace(b'{"request_id"', b'{"request_id":"x","request_id"')
    with pytest.raises(ChainError):
        ChainChecker().check(line)


def test_checkpoint_roundtrip_and_signature() -> None:
    key = SigningKey.from_seed_hex(SEED)
    cp = make_checkpoint(4, "ab" * 32, rfc3339(1.0), key)
    assert decode_checkpoint(encode_checkpoint(cp)[:-1]) == cp
    assert checkpoint_problem(cp, key.public) is None
    forged = make_checkpoint(5, "ab" * 32, rfc3339(1.0), key)
    bad = decode_checkpoint(encode_checkpoint(cp)[:-1].replace(b'"seq":4', b'"seq":5'))
    assert bad.signature == cp.signature and forged.signature != cp.signature
    assert "bad signature" in (checkpoint_problem(bad, key.public) or "")
    other = SigningKey.from_seed_hex("22" * 32).public
    assert "signed by key" in (checkpoint_problem(cp, other) or "")


def test_dedup_key_prefers_dedup_key() -> None:
    assert dedup_key({"request_id": "a", "dedup_key": "fb:1"}) == "fb:1"
    assert dedup_key({"request_id": "a"}) == "a"
    assert dedup_key({"kind": "x"}) is None


def test_config_validation() -> None:
    assert LedgerSinkConfig().fsync == "batch"
    with pytest.raises(ValueError, match="64 hex"):
        LedgerSinkConfig(signing_seed_hex="nope")
    with pytest.raises(ValueError, match="strict needs fsync"):
        LedgerSinkConfig(durability="strict", fsync="never")
    with pytest.raises(ValueError, match="one of"):
        LedgerSinkConfig(on_full="drop")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=">= 1"):
        LedgerSinkConfig(mailbox=0)


def test_rfc3339_matches_datetime_across_seconds_and_rounding() -> None:
    import datetime as dt

    for t in (0.0, 0.5, 1.9999994, 1.9999996, 59.000001, 1_796_300_000.123456,
              1_796_300_000.999_999_7, 1_796_300_001.0):
        stamp = rfc3339(t)
        assert len(stamp) == 27 and stamp.endswith("Z")
        parsed = dt.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=dt.UTC)
        assert abs(parsed.timestamp() - t) < 2e-6, (t, stamp)


def test_normalize_fast_path_equals_the_general_definition() -> None:
    """The fast path for exact built-in types must give exactly what the general version gives
    (it defines the bytes every verifier recomputes), on nested random events too."""
    import random
    from collections import OrderedDict
    from enum import IntEnum

    from sbactor.ledger.chain import _normalize_general

    class Level(IntEnum):
        HIGH = 3

    class Tag(str):
        pass

    atoms = [None, True, False, 0, -7, 2**70, 1.5, float("nan"), float("-inf"), "ascii",
             "é ü 漢字", "bad\udc80", "", Level.HIGH, Tag("t"), object, b"bytes", ("x", 1.0)]

    def build(rng: random.Random, depth: int) -> object:
        if depth == 0 or rng.random() < 0.3:
            return rng.choice(atoms)
        kind = rng.choice(["dict", "list", "tuple", "odict"])
        items = [build(rng, depth - 1) for _ in range(rng.randint(0, 4))]
        if kind == "list":
            return items
        if kind == "tuple":
            return tuple(items)
        keys = [rng.choice(["k", "é", "\udc81", 1, 2.5, None, True, "k2", Level.HIGH])
                for _ in items]
        pairs = dict(zip(keys, items, strict=True))
        return OrderedDict(pairs) if kind == "odict" else pairs

    rng = random.Random(7)
    for _ in range(2000):
        event = {"request_id": "r", "body": build(rng, 4)}
        assert normalize_event(event) == _normalize_general(event)
        assert canonical_json(normalize_event(event)) == canonical_json(_normalize_general(event))
