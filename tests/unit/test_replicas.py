"""replicas_by_variant: largest remainder, at least one per weighted variant when it can."""

from __future__ import annotations

import pytest
from kubemaas_operator.api import Variant
from kubemaas_operator.builders import replicas_by_variant


def variants(*weights: int) -> list[Variant]:
    return [Variant(name=f"v{i}", weight=w) for i, w in enumerate(weights)]


@pytest.mark.parametrize(
    ("total", "weights", "expected"),
    [
        (1, (100,), (1,)),
        (0, (80, 20), (0, 0)),                # scaled to zero
        (5, (80, 20), (4, 1)),                # exact
        (10, (80, 20), (8, 2)),
        (2, (80, 20), (1, 1)),                # 1.6/0.4 -> 2/0, then the 20% variant gets one
        (1, (80, 20), (1, 0)),                # not enough to go round: the heavier variant
        (3, (34, 33, 33), (1, 1, 1)),
        (4, (34, 33, 33), (2, 1, 1)),         # remainder to the largest fraction
        (2, (50, 50), (1, 1)),
        (3, (50, 50), (2, 1)),                # tie on the remainder: listed first wins
        (3, (98, 1, 1), (1, 1, 1)),           # every weighted variant gets a pod
        (2, (98, 1, 1), (1, 1, 0)),           # ...as far as the total allows
        (4, (0, 100), (0, 4)),                # weight 0: no pods (kept at 0, ready to shift)
        (7, (70, 30), (5, 2)),                # 4.9/2.1 -> 5/2
        (1000, (33, 33, 34), (330, 330, 340)),
    ],
)
def test_split(total, weights, expected):
    split = replicas_by_variant(total, variants(*weights))
    assert tuple(split.values()) == expected
    assert sum(split.values()) == total


@pytest.mark.parametrize("total", range(40))
def test_split_always_sums_to_total_and_respects_weight_order(total):
    weights = (50, 25, 15, 10)
    split = list(replicas_by_variant(total, variants(*weights)).values())
    assert sum(split) == total
    assert split == sorted(split, reverse=True)
    if total >= len(weights):
        assert all(count >= 1 for count in split)
