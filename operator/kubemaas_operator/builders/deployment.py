"""One Deployment per variant: `<name>-<variant>`, and during a canary one more for the new
revision (`<name>-<variant>-<revision>`, which stays when it is promoted)."""

from __future__ import annotations

from typing import Any

from kubemaas_operator import gpufit
from kubemaas_operator.api import ModelService, Variant
from kubemaas_operator.builders.layout import Track
from kubemaas_operator.builders.naming import (
    child_metadata,
    variant_child_name,
    variant_labels,
    variant_selector_labels,
)
from kubemaas_operator.builders.pod import build_pod_template
from kubemaas_operator.builders.revision import (
    REVISION_LABEL,
    STABLE,
    TRACK_LABEL,
)
from kubemaas_operator.settings import OperatorSettings


def canary_deployment_name(ms_name: str, variant: str, revision: str) -> str:
    return f"{variant_child_name(ms_name, variant)}-{revision}"


def build_variant_deployment(
    ms: ModelService, variant: Variant, track: Track, settings: OperatorSettings, runtime_image: str,
    role: str = STABLE,
) -> dict[str, Any]:
    """The Deployment `track.deployment` serving `variant` as the spec has it (revision
    `track.revision`), with `track.replicas` pods, labelled as the `role` (stable or canary).

    Every Deployment of a variant selects the same labels (a selector cannot change, and the
    first one is `<name>-<variant>`); each owns its ReplicaSets by controller reference, so two
    of them (stable and canary) never adopt each other's pods. The pods carry their revision,
    which the per-revision Services of a canary through a gateway select on.
    """
    rollout = ms.spec.rollout
    template = build_pod_template(ms, variant, settings, runtime_image)
    template["metadata"]["labels"][REVISION_LABEL] = track.revision
    labels = {**variant_labels(ms.name, variant.name), REVISION_LABEL: track.revision, TRACK_LABEL: role}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": child_metadata(ms, track.deployment, labels),
        "spec": {
            "replicas": track.replicas,
            "selector": {"matchLabels": variant_selector_labels(ms.name, variant.name)},
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxSurge": rollout.max_surge, "maxUnavailable": rollout.max_unavailable},
            },
            "revisionHistoryLimit": 5,
            # A model may take its startup probe's budget to load; report no progress only after that.
            "progressDeadlineSeconds": gpufit.startup_seconds(ms, variant, settings.startup_timeout_seconds) + 300,
            "template": template,
        },
    }
