"""How `spec.replicas` (the total) splits over the variants.

The rule (docs/api.md): largest remainder on the weights, then every variant with weight > 0
that got no replica takes one from the variant holding the most, as long as the total allows.
Ties go to the higher weight, then to the variant listed first. Weight-0 variants get 0.
"""

from __future__ import annotations

from collections.abc import Sequence

from kubemaas_operator.api import Variant


def replicas_by_variant(total: int, variants: Sequence[Variant]) -> dict[str, int]:
    """{variant name: replicas}, summing to `total` (for weights that sum to 100)."""
    weight_sum = sum(v.weight for v in variants)
    if total <= 0 or weight_sum == 0:
        return {v.name: 0 for v in variants}
    quotas = [total * v.weight / weight_sum for v in variants]
    counts = [int(q) for q in quotas]
    by_remainder = sorted(
        range(len(variants)), key=lambda i: (-(quotas[i] - counts[i]), -variants[i].weight, i)
    )
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    # Every variant with traffic gets a pod when there are pods enough to go round.
    for i in sorted(range(len(variants)), key=lambda i: (-variants[i].weight, i)):
        if variants[i].weight == 0 or counts[i] > 0:
            continue
        donor = max(range(len(variants)), key=lambda j: (counts[j], variants[j].weight, -j))
        if counts[donor] <= 1:
            break
        counts[donor] -= 1
        counts[i] += 1
    return {v.name: count for v, count in zip(variants, counts, strict=True)}
