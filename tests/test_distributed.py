"""psr.distributed helpers that need no process group."""

from __future__ import annotations

import pytest

from psr.distributed import split_evenly


@pytest.mark.parametrize("n", [0, 1, 3, 4, 7, 8])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_split_evenly_shares_restore_the_order_and_pad_to_the_largest(n: int, world: int) -> None:
    shares = [split_evenly(n, r, world) for r in range(world)]
    assert [i for share, _ in shares for i in share] == list(range(n))  # rank order == item order
    sizes = {size for _, size in shares}
    assert len(sizes) == 1 and sizes.pop() == max(len(share) for share, _ in shares) == -(-n // world)
