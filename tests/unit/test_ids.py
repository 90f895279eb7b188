import re

from sbactor.ids import new_id


def test_ids_are_32_hex_and_unique_across_refills() -> None:
    ids = [new_id() for _ in range(5000)]  # ~20 refills of the random pool
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
    assert len(set(ids)) == len(ids)
