"""Names, labels, selectors and the owner reference every child carries."""

from __future__ import annotations

from typing import Any

from kubemaas_operator.api import API_VERSION, KIND, ModelService
from kubemaas_operator.settings import OperatorSettings

MODELSERVICE_LABEL = "kubemaas.io/modelservice"
VARIANT_LABEL = "kubemaas.io/variant"
RUNTIME_CONTAINER = "runtime"
FETCH_CONTAINER = "fetch-model"
SERVICE_PORT = 80
# Offline (`render`) there is no uid yet; the API server assigns one at create.
PLACEHOLDER_UID = "00000000-0000-0000-0000-000000000000"


def variant_child_name(ms_name: str, variant: str) -> str:
    """`<name>-<variant>`: the variant's Deployment and Service (at most 63 characters)."""
    return f"{ms_name}-{variant}"


def selector_labels(ms_name: str) -> dict[str, str]:
    """Selects every pod of the ModelService, over all variants."""
    return {MODELSERVICE_LABEL: ms_name}


def variant_selector_labels(ms_name: str, variant: str) -> dict[str, str]:
    """Selects one variant's pods (the Deployment's immutable selector)."""
    return {MODELSERVICE_LABEL: ms_name, VARIANT_LABEL: variant}


def selector_string(ms_name: str) -> str:
    """status.selector, the /scale label selector: `kubemaas.io/modelservice=<name>`."""
    return f"{MODELSERVICE_LABEL}={ms_name}"


def service_url(ms: ModelService, settings: OperatorSettings) -> str:
    """status.url through the Service `<name>`: the model's v2 endpoint, or for a text-generation
    model its OpenAI API base `/v1`."""
    base = f"http://{ms.name}.{ms.namespace}.svc.{settings.cluster_domain}"
    if ms.spec.model.generative:
        return f"{base}/v1"
    return f"{base}/v2/models/{ms.name}"


def common_labels(ms_name: str, component: str = "model-server") -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "kubemaas-runtime",
        "app.kubernetes.io/instance": ms_name,
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/managed-by": "kubemaas-operator",
        "app.kubernetes.io/part-of": "kubemaas",
        MODELSERVICE_LABEL: ms_name,
    }


def variant_labels(ms_name: str, variant: str) -> dict[str, str]:
    return {**common_labels(ms_name), VARIANT_LABEL: variant}


def owner_reference(ms: ModelService) -> dict[str, Any]:
    """The controller reference to the ModelService: garbage collection deletes the children."""
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": ms.name,
        "uid": ms.metadata.uid or PLACEHOLDER_UID,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def child_metadata(ms: ModelService, name: str, labels: dict[str, str]) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": ms.namespace,
        "labels": labels,
        "ownerReferences": [owner_reference(ms)],
    }
