"""The PodDisruptionBudget: voluntary evictions (node drains) take one pod at a time."""

from __future__ import annotations

from typing import Any

from kubemaas_operator.api import ModelService
from kubemaas_operator.builders.naming import child_metadata, common_labels, selector_labels


def wants_disruption_budget(ms: ModelService) -> bool:
    """When the ModelService can run more than one pod: replicas > 1, or autoscaling beyond 1.

    Counting maxReplicas keeps the budget from coming and going as the autoscaler moves.
    """
    scaling = ms.spec.autoscaling
    return ms.spec.replicas > 1 or (scaling is not None and scaling.max_replicas > 1)


def build_disruption_budget(ms: ModelService) -> dict[str, Any]:
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": child_metadata(ms, ms.name, common_labels(ms.name)),
        "spec": {
            "maxUnavailable": 1,
            "selector": {"matchLabels": selector_labels(ms.name)},
            # A pod that never became ready (crash loop, bad image) must not block a node drain.
            "unhealthyPodEvictionPolicy": "AlwaysAllow",
        },
    }
