"""The Services: `<name>` over every variant, `<name>-<variant>` for each one."""

from __future__ import annotations

from typing import Any

from kubemaas_operator.api import ModelService, Variant
from kubemaas_operator.builders.naming import (
    SERVICE_PORT,
    child_metadata,
    common_labels,
    selector_labels,
    variant_child_name,
    variant_labels,
    variant_selector_labels,
)
from kubemaas_operator.builders.revision import REVISION_LABEL
from kubemaas_operator.runtime_contract import HTTP_PORT


def _service(ms: ModelService, name: str, labels: dict[str, str], selector: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": child_metadata(ms, name, labels),
        "spec": {
            "type": "ClusterIP",
            "selector": selector,
            "ports": [
                {"name": "http", "port": SERVICE_PORT, "targetPort": HTTP_PORT, "protocol": "TCP", "appProtocol": "http"}
            ],
        },
    }


def build_model_service(ms: ModelService) -> dict[str, Any]:
    """`<name>`: every ready pod of every variant (traffic splits by pod count)."""
    return _service(ms, ms.name, common_labels(ms.name), selector_labels(ms.name))


def revision_service_name(ms_name: str, variant: str, revision: str) -> str:
    return f"{variant_child_name(ms_name, variant)}-{revision}"


def build_revision_service(ms: ModelService, variant: str, revision: str) -> dict[str, Any]:
    """`<name>-<variant>-<revision>`: one revision's pods, the HTTPRoute's backend during and
    around a canary, so the split between the stable and the new revision is exact."""
    labels = {**variant_labels(ms.name, variant), REVISION_LABEL: revision}
    selector = {**variant_selector_labels(ms.name, variant), REVISION_LABEL: revision}
    return _service(ms, revision_service_name(ms.name, variant, revision), labels, selector)


def build_variant_service(ms: ModelService, variant: Variant) -> dict[str, Any]:
    """`<name>-<variant>`: one variant's pods (the HTTPRoute's backends; direct testing)."""
    return _service(
        ms,
        variant_child_name(ms.name, variant.name),
        variant_labels(ms.name, variant.name),
        variant_selector_labels(ms.name, variant.name),
    )
