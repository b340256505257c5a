"""One Deployment per variant, `<name>-<variant>`."""

from __future__ import annotations

from typing import Any

from kubemaas_operator.api import ModelService, Variant
from kubemaas_operator.builders.naming import (
    child_metadata,
    variant_child_name,
    variant_labels,
    variant_selector_labels,
)
from kubemaas_operator.builders.pod import build_pod_template
from kubemaas_operator.settings import OperatorSettings


def build_variant_deployment(
    ms: ModelService, variant: Variant, replicas: int, settings: OperatorSettings, runtime_image: str
) -> dict[str, Any]:
    """The Deployment serving `variant` with `replicas` pods (its share of spec.replicas)."""
    rollout = ms.spec.rollout
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": child_metadata(ms, variant_child_name(ms.name, variant.name), variant_labels(ms.name, variant.name)),
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": variant_selector_labels(ms.name, variant.name)},
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxSurge": rollout.max_surge, "maxUnavailable": rollout.max_unavailable},
            },
            "revisionHistoryLimit": 5,
            # A model may take startup_timeout_seconds to load; report no progress only after that.
            "progressDeadlineSeconds": settings.startup_timeout_seconds + 300,
            "template": build_pod_template(ms, variant, settings, runtime_image),
        },
    }
