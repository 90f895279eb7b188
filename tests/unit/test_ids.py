import re
from typing import SupportsIndex

import pytest

from sbactor.ids import new_id


def test_ids_are_32_hex_and_unique_across_refills() -> None:
    ids = [new_id() for _ in range(5000)]  # ~20 refills of the random pool
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
    assert len(set(ids)) == len(ids)


def test_a_forked_child_does_not_repeat_the_parents_ids() -> None:
    import os

    import sbactor.ids

    while not sbactor.ids._pool:  # the pool holds ids a child would inherit
        new_id()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: one id to the parent, then out without pytest's teardown
        try:
            os.write(write, new_id().encode())
        finally:
            os._exit(0)
    os.close(write)
    child = os.read(read, 64).decode()
    os.close(read)
    os.waitpid(pid, 0)
    assert re.fullmatch(r"[0-9a-f]{32}", child)
    assert child != new_id()


def test_an_id_taken_between_the_check_and_the_pop_means_a_refill(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import sbactor.ids

    class Raced(list[str]):
        """Another thread pops the last id just before we do, once."""

        raced = False

        def pop(self, index: SupportsIndex = -1) -> str:
            if not self.raced:
                self.raced = True
                super().pop()
            return super().pop(index)

    monkeypatch.setattr(sbactor.ids, "_pool", Raced(["0" * 32]))
    assert re.fullmatch(r"[0-9a-f]{32}", new_id())
