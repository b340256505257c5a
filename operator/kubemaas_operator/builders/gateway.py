"""The Gateway API HTTPRoute: exact per-variant weights, when spec.gateway is set."""

from __future__ import annotations

from typing import Any

from kubemaas_operator.api import ModelService
from kubemaas_operator.builders.naming import (
    SERVICE_PORT,
    child_metadata,
    common_labels,
    variant_child_name,
)

GATEWAY_GROUP = "gateway.networking.k8s.io"


def build_http_route(ms: ModelService) -> dict[str, Any] | None:
    """Requests under /v2/models/<name> split over the variant Services by weight."""
    gateway = ms.spec.gateway
    if gateway is None:
        return None
    parent: dict[str, Any] = {"group": GATEWAY_GROUP, "kind": "Gateway", "name": gateway.name}
    if gateway.namespace:
        parent["namespace"] = gateway.namespace
    if gateway.section_name:
        parent["sectionName"] = gateway.section_name
    backends = [
        {"group": "", "kind": "Service", "name": variant_child_name(ms.name, v.name), "port": SERVICE_PORT,
         "weight": v.weight}
        for v in ms.spec.variants
    ]
    return {
        "apiVersion": f"{GATEWAY_GROUP}/v1",
        "kind": "HTTPRoute",
        "metadata": child_metadata(ms, ms.name, common_labels(ms.name, "route")),
        "spec": {
            "parentRefs": [parent],
            "rules": [
                {
                    "matches": [{"path": {"type": "PathPrefix", "value": f"/v2/models/{ms.name}"}}],
                    "backendRefs": backends,
                }
            ],
        },
    }
