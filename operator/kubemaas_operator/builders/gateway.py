"""The Gateway API HTTPRoute: exact per-variant weights, when spec.gateway is set."""

from __future__ import annotations

from typing import Any

from kubemaas_operator.api import GatewayRef, ModelService
from kubemaas_operator.builders.naming import (
    SERVICE_PORT,
    child_metadata,
    common_labels,
)

GATEWAY_GROUP = "gateway.networking.k8s.io"
# runtime/kubemaas_runtime/embeddings.py serves these for feature-extraction models
EMBEDDINGS_PATHS = ("/v1/embeddings", "/v1/models")


def route_matches(ms: ModelService) -> list[dict[str, Any]]:
    """The v2 path of the model; OpenAI's API names the model in the body, not the path, so a
    generative model's /v1 is matched whole, and a feature-extraction model's two OpenAI routes
    (/v1/embeddings, /v1/models) exactly: one OpenAI model per Gateway listener or hostname."""
    matches = [{"path": {"type": "PathPrefix", "value": f"/v2/models/{ms.name}"}}]
    if ms.spec.model.generative:
        matches.append({"path": {"type": "PathPrefix", "value": "/v1"}})
    elif ms.spec.model.task == "feature-extraction":
        matches.extend({"path": {"type": "Exact", "value": path}} for path in EMBEDDINGS_PATHS)
    return matches


def gateway_parent(gateway: GatewayRef) -> dict[str, Any]:
    """The HTTPRoute's parentRef: spec.gateway."""
    parent: dict[str, Any] = {"group": GATEWAY_GROUP, "kind": "Gateway", "name": gateway.name}
    if gateway.namespace:
        parent["namespace"] = gateway.namespace
    if gateway.section_name:
        parent["sectionName"] = gateway.section_name
    return parent


def build_http_route(ms: ModelService, backends: list[tuple[str, int]]) -> dict[str, Any] | None:
    """Requests under /v2/models/<name> (and the OpenAI API: for a text-generation model all of
    /v1, for a feature-extraction model /v1/embeddings and /v1/models) split over `backends`, (Service, weight) pairs with relative weights
    (`layout.route_backends`: per variant, or per revision under Canary)."""
    gateway = ms.spec.gateway
    if gateway is None:
        return None
    backend_refs = [
        {"group": "", "kind": "Service", "name": service, "port": SERVICE_PORT, "weight": weight}
        for service, weight in backends
    ]
    return {
        "apiVersion": f"{GATEWAY_GROUP}/v1",
        "kind": "HTTPRoute",
        "metadata": child_metadata(ms, ms.name, common_labels(ms.name, "route")),
        "spec": {
            "parentRefs": [gateway_parent(gateway)],
            "rules": [
                {
                    "matches": route_matches(ms),
                    "backendRefs": backend_refs,
                }
            ],
        },
    }
