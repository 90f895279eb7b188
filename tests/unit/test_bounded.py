"""Fixed-memory key tables (sbactor/bounded.py): exactness, bounds, eviction order, memory."""

from __future__ import annotations

import random
import uuid

import pytest

from sbactor.bounded import KEY_BYTES, KeyRing, RecentKeys, compact_key


def test_compact_key_is_lossless_for_lowercase_hex_ids() -> None:
    rid = uuid.uuid4().hex
    assert compact_key(rid) == bytes.fromhex(rid)
    # anything else goes through the keyed digest: upper case, other lengths, non-hex
    assert compact_key(rid.upper()) != compact_key(rid)
    assert compact_key(rid[:-1]) != compact_key(rid)
    for other in ("fb:r1:1", "r1", "", "é" * 32, " " + rid[1:], "g" * 32, "\ud800"):
        key = compact_key(other)
        assert len(key) == KEY_BYTES and key == compact_key(other)
    assert len({compact_key(f"r{i}") for i in range(10_000)}) == 10_000


def test_recent_keys_holds_the_last_capacity_adds() -> None:
    keys = RecentKeys(3)
    for k in ("a", "b", "c"):
        keys.add(k)
    assert all(k in keys for k in "abc") and len(keys) == 3
    keys.add("d")  # the oldest goes first
    assert "a" not in keys and all(k in keys for k in "bcd") and len(keys) == 3
    keys.add("b")  # present: it becomes the newest (its old place is left empty)
    keys.add("e")  # evicts c: the table holds the keys of the last three adds (d, b, e)
    assert "c" not in keys and all(k in keys for k in "dbe")
    assert 5 not in keys and b"x" not in keys  # only str keys are members


@pytest.mark.parametrize("capacity", [1, 2, 3, 7, 64])
def test_recent_keys_against_a_model(capacity: int) -> None:
    rng = random.Random(capacity)
    keys = RecentKeys(capacity)
    adds: list[str] = []
    for _ in range(4000):
        k = f"k{rng.randrange(3 * capacity + 3)}"
        if rng.random() < 0.5:
            assert (k in keys) == (k in adds[-capacity:])
        else:
            keys.add(k)
            adds.append(k)
        assert len(keys) == len(set(adds[-capacity:])) <= capacity


def test_key_ring_values_removal_and_eviction_order() -> None:
    rng = random.Random(7)
    ring = KeyRing(50, value_size=2)
    live: dict[bytes, bytes] = {}
    order: list[bytes] = []  # insertion order of live keys
    for _ in range(20_000):
        key = compact_key(f"x{rng.randrange(120)}")
        slot = ring.find(key)
        assert (slot >= 0) == (key in live)
        if slot >= 0:
            assert ring.value(slot) == live[key]
            if rng.random() < 0.3:
                ring.remove(slot)
                del live[key]
                order.remove(key)
            continue
        value = rng.randbytes(2)
        full = all(ring._live)  # the slot the insertion takes holds the oldest entry
        evicted = ring.insert(key, value)
        if evicted is not None:
            oldest = order.pop(0)
            assert live.pop(oldest) == evicted and ring.find(oldest) < 0
        else:
            assert not full
        live[key] = value
        order.append(key)
        assert len(ring) == len(live) <= 50
    assert list(ring.keys()) == order


def test_key_ring_set_value_and_clear() -> None:
    ring = KeyRing(4, value_size=1)
    ring.insert(compact_key("a"), b"\0")
    slot = ring.find(compact_key("a"))
    ring.set_value(slot, b"\1")
    assert ring.value(slot) == b"\1"
    with pytest.raises(ValueError):
        ring.set_value(slot, b"\1\2")
    with pytest.raises(ValueError):
        ring.insert(b"short", b"\0")
    ring.clear()
    assert len(ring) == 0 and ring.find(compact_key("a")) == -1
    ring.insert(compact_key("a"), b"\2")
    assert ring.value(ring.find(compact_key("a"))) == b"\2"


def test_memory_is_fixed_and_small() -> None:
    keys = RecentKeys(100_000)
    before = keys.nbytes()
    assert before <= 30 * 100_000  # ~27.5 bytes per key, all allocated up front
    for _ in range(150_000):
        keys.add(uuid.uuid4().hex)
    assert keys.nbytes() == before and len(keys) == 100_000


def test_capacity_must_be_sane() -> None:
    with pytest.raises(ValueError):
        RecentKeys(0)
    with pytest.raises(ValueError):
        KeyRing(2**30)
