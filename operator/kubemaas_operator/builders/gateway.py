"""The Gateway API HTTPRoute: exact per-variant weights, when spec.gateway is set."""

from __future__ import annotations

from typing import Any

from kubemaas_operator.api import ModelService
from kubemaas_operator.builders.naming import (
    SERVICE_PORT,
    child_metadata,
    common_labels,
)

GATEWAY_GROUP = "gateway.networking.k8s.io"


def route_matches(ms: ModelService) -> list[dict[str, Any]]:
    """The v2 path of the model; a generative model's OpenAI API names the model in the body,
    so /v1 is matched whole (one generative model per Gateway listener or hostname)."""
    matches = [{"path": {"type": "PathPrefix", "value": f"/v2/models/{ms.name}"}}]
    if ms.spec.model.generative:
        matches.append({"path": {"type": "PathPrefix", "value": "/v1"}})
    return matches


def build_http_route(ms: ModelService, backends: list[tuple[str, int]]) -> dict[str, Any] | None:
    """Requests under /v2/models/<name> (and for a text-generation model the OpenAI API under
    /v1) split over `backends`, (Service, weight) pairs with relative weights
    (`layout.route_backends`: per variant, or per revision under Canary)."""
    gateway = ms.spec.gateway
    if gateway is None:
        return None
    parent: dict[str, Any] = {"group": GATEWAY_GROUP, "kind": "Gateway", "name": gateway.name}
    if gateway.namespace:
        parent["namespace"] = gateway.namespace
    if gateway.section_name:
        parent["sectionName"] = gateway.section_name
    backend_refs = [
        {"group": "", "kind": "Service", "name": service, "port": SERVICE_PORT, "weight": weight}
        for service, weight in backends
    ]
    return {
        "apiVersion": f"{GATEWAY_GROUP}/v1",
        "kind": "HTTPRoute",
        "metadata": child_metadata(ms, ms.name, common_labels(ms.name, "route")),
        "spec": {
            "parentRefs": [parent],
            "rules": [
                {
                    "matches": route_matches(ms),
                    "backendRefs": backend_refs,
                }
            ],
        },
    }
