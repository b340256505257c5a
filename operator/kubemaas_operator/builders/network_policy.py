"""The NetworkPolicy of a ModelService: its pods' port admits only the namespaces that need it.

Admitted: the ModelService's own namespace (clients of its Services), its Gateway's namespace
(spec.gateway), the namespaces spec.network.allowedNamespaces lists, and the metrics scraper's
(the operator's metrics_namespace). Everything else is refused by a cluster whose network plugin
enforces NetworkPolicy; kubelet probes are not pod traffic and are unaffected. Only ingress is
restricted: the runtime makes no connections of its own while serving (the fetch step runs
before, and may reach s3 or the hub).
"""

from __future__ import annotations

from typing import Any

from kubemaas_operator.api import ModelService
from kubemaas_operator.builders.naming import (
    child_metadata,
    common_labels,
    selector_labels,
)
from kubemaas_operator.runtime_contract import HTTP_PORT
from kubemaas_operator.settings import OperatorSettings

NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"  # set by the API server on every namespace


def admitted_namespaces(ms: ModelService, settings: OperatorSettings) -> list[str]:
    """Sorted, without repeats: the namespaces whose pods may reach the model's port."""
    names = {ms.namespace, settings.metrics_namespace, *ms.spec.network.allowed_namespaces}
    if ms.spec.gateway is not None:
        names.add(ms.spec.gateway.namespace or ms.namespace)
    return sorted(n for n in names if n)


def build_network_policy(ms: ModelService, settings: OperatorSettings) -> dict[str, Any] | None:
    """None when the operator is configured not to create NetworkPolicies."""
    if not settings.network_policy:
        return None
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": child_metadata(ms, ms.name, common_labels(ms.name)),
        "spec": {
            "podSelector": {"matchLabels": selector_labels(ms.name)},
            "policyTypes": ["Ingress"],
            "ingress": [{
                "from": [{"namespaceSelector": {"matchExpressions": [{
                    "key": NAMESPACE_NAME_LABEL, "operator": "In",
                    "values": admitted_namespaces(ms, settings)}]}}],
                "ports": [{"protocol": "TCP", "port": HTTP_PORT}],
            }],
        },
    }
