"""Fixed-memory tables of recent request keys (ledger dedup, feedback, budget reconciles).

A ``dict``/``OrderedDict`` of ``str`` keys costs ~150 bytes per key (the 32-character key
alone is 81), so a 100,000-key window grows the heap by ~15 MB while it fills. These tables
store each key as 16 bytes in one preallocated ``bytearray`` (a ring in insertion order, so
the oldest key is evicted first) with an open-addressing index of 32-bit slots at load <= 1/2:
about 26 bytes per key plus the payload, all allocated up front. A full table costs no more
memory than an empty one, so memory is flat from the first request.

Keys are compacted by ``compact_key``: a 32-digit lowercase hex key (``uuid4().hex``, what the
gateway itself generates for request ids and dedup keys) is stored as its 16 raw bytes,
which is lossless; any other key as a BLAKE2b-128 digest keyed with a secret drawn at process
start, so two different keys collide with probability 2**-128 and nobody can aim for a
collision (or for long probe chains: the index position is Python's randomized ``hash``).
"""

from __future__ import annotations

import hashlib
import os
from array import array
from collections.abc import Iterable, Iterator

KEY_BYTES = 16
_SECRET = os.urandom(32)


def compact_key(key: str) -> bytes:
    """The 16-byte form of ``key`` (lossless for 32 lowercase hex digits, else a digest)."""
    if len(key) == 32:
        try:
            raw = bytes.fromhex(key)
        except ValueError:
            pass
        else:
            if len(raw) == KEY_BYTES and raw.hex() == key:  # exactly 32 lowercase hex digits
                return raw
    data = key.encode("utf-8", "surrogatepass")
    return hashlib.blake2b(data, digest_size=KEY_BYTES, key=_SECRET).digest()


class KeyRing:
    """``capacity`` entries of 16-byte key + ``value_size`` payload bytes, oldest evicted first.

    Memory is allocated once: ``capacity * (17 + value_size)`` bytes for the ring and 4 bytes
    per index slot (at least ``2 * capacity`` slots). Removing an entry (``discard``) leaves a
    hole in the ring, so the table always holds the keys among the last ``capacity``
    insertions, and exactly the last ``capacity`` distinct keys when none was removed.
    """

    __slots__ = ("_index", "_live", "_mask", "_next", "_ring", "_size", "_width", "capacity",
                 "value_size")

    def __init__(self, capacity: int, value_size: int = 0) -> None:
        if not 1 <= capacity < 2**30:
            raise ValueError(f"capacity must be between 1 and 2**30 - 1, got {capacity}")
        if value_size < 0:
            raise ValueError("value_size must be >= 0")
        self.capacity = capacity
        self.value_size = value_size
        self._width = KEY_BYTES + value_size
        self._ring = bytearray(capacity * self._width)
        self._live = bytearray(capacity)  # 1 where the ring slot holds an entry
        slots = 1 << max(3, (2 * capacity - 1).bit_length())
        self._index = array("i", [-1]) * slots  # ring slot number, or -1 (empty)
        self._mask = slots - 1
        self._next = 0  # the ring slot the next insertion takes (the oldest entry, if any)
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def nbytes(self) -> int:
        """Memory held by the table's buffers (constant for its lifetime)."""
        return len(self._ring) + len(self._live) + len(self._index) * self._index.itemsize

    # ---- lookups -----------------------------------------------------------------------

    def find(self, key: bytes) -> int:
        """The ring slot holding ``key``, or -1."""
        index, ring, width, mask = self._index, self._ring, self._width, self._mask
        i = hash(key) & mask
        while True:
            slot = index[i]
            if slot < 0:
                return -1
            if ring.startswith(key, slot * width):
                return slot
            i = (i + 1) & mask

    def __contains__(self, key: object) -> bool:
        return isinstance(key, bytes) and self.find(key) >= 0

    def value(self, slot: int) -> bytes:
        start = slot * self._width + KEY_BYTES
        return bytes(self._ring[start:start + self.value_size])

    def set_value(self, slot: int, value: bytes) -> None:
        if len(value) != self.value_size:
            raise ValueError(f"value must be {self.value_size} bytes, got {len(value)}")
        start = slot * self._width + KEY_BYTES
        self._ring[start:start + self.value_size] = value

    def keys(self) -> Iterator[bytes]:
        """Oldest first."""
        n, width = self.capacity, self._width
        for k in range(n):
            slot = (self._next + k) % n
            if self._live[slot]:
                yield bytes(self._ring[slot * width:slot * width + KEY_BYTES])

    # ---- updates -----------------------------------------------------------------------

    def insert(self, key: bytes, value: bytes = b"") -> bytes | None:
        """Append ``key`` (which must not be present) as the newest entry. When the ring is
        full the oldest entry goes first: its value is returned (else ``None``)."""
        if len(key) != KEY_BYTES or len(value) != self.value_size:
            raise ValueError(f"key must be {KEY_BYTES} bytes and value {self.value_size}")
        slot = self._next
        evicted = None
        if self._live[slot]:
            evicted = self.value(slot)
            self.remove(slot)
        start = slot * self._width
        self._ring[start:start + self._width] = key + value
        self._live[slot] = 1
        self._size += 1
        index, mask = self._index, self._mask
        i = hash(key) & mask
        while index[i] >= 0:
            i = (i + 1) & mask
        index[i] = slot
        self._next = slot + 1 if slot + 1 < self.capacity else 0
        return evicted

    def remove(self, slot: int) -> None:
        """Drop the entry in ring slot ``slot`` (backward-shift deletion: no tombstones)."""
        if not self._live[slot]:
            raise KeyError(slot)
        index, ring, width, mask = self._index, self._ring, self._width, self._mask
        start = slot * width
        i = hash(bytes(ring[start:start + KEY_BYTES])) & mask
        while index[i] != slot:
            i = (i + 1) & mask
        j = i
        while True:
            j = (j + 1) & mask
            other = index[j]
            if other < 0:
                break
            o = other * width
            home = hash(bytes(ring[o:o + KEY_BYTES])) & mask
            if (j - home) & mask >= (j - i) & mask:  # home is not in (i, j]: move it up
                index[i] = other
                i = j
        index[i] = -1
        self._live[slot] = 0
        self._size -= 1

    def clear(self) -> None:
        self._index[:] = array("i", [-1]) * len(self._index)
        self._live[:] = bytes(self.capacity)
        self._next = 0
        self._size = 0


class RecentKeys:
    """The set of the most recent ``capacity`` string keys, in fixed memory (see ``KeyRing``).

    ``add`` of a key already present makes it the newest again.
    """

    __slots__ = ("_ring",)

    def __init__(self, capacity: int, keys: Iterable[str] = ()) -> None:
        self._ring = KeyRing(capacity)
        for key in keys:
            self.add(key)

    @property
    def capacity(self) -> int:
        return self._ring.capacity

    def __len__(self) -> int:
        return len(self._ring)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self._ring.find(compact_key(key)) >= 0

    def contains_compact(self, key: bytes) -> bool:
        return self._ring.find(key) >= 0

    def add(self, key: str) -> None:
        self.add_compact(compact_key(key))

    def add_compact(self, key: bytes) -> None:
        slot = self._ring.find(key)
        if slot >= 0:
            self._ring.remove(slot)
        self._ring.insert(key)

    def nbytes(self) -> int:
        return self._ring.nbytes()
