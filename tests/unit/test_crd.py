"""The generated CRD: in sync with the checked-in copy, structural, bounded for CEL."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import kubernetes_validate
import yaml
from kubemaas_operator.api import rules
from kubemaas_operator.crd import build_crd, crd_yaml

from tests.unit.support import REPO

CRD_PATH = REPO / "crds" / "modelservices.kubemaas.io.yaml"
K8S_VERSION = "1.35.0"


def schema() -> dict[str, Any]:
    return build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def walk(node: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    yield path, node
    for key, child in (node.get("properties") or {}).items():
        yield from walk(child, f"{path}.{key}")
    if isinstance(node.get("items"), dict):
        yield from walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from walk(node["additionalProperties"], f"{path}{{}}")


def test_checked_in_crd_matches_the_models():
    assert CRD_PATH.read_text() == crd_yaml(), (
        "crds/modelservices.kubemaas.io.yaml is stale: run "
        "`python -m kubemaas_operator crd -o crds/modelservices.kubemaas.io.yaml`"
    )


def test_crd_is_a_valid_kubernetes_object():
    kubernetes_validate.validate(yaml.safe_load(CRD_PATH.read_text()), K8S_VERSION, strict=True)


def test_names_scope_and_subresources():
    crd = build_crd()
    assert crd["metadata"]["name"] == "modelservices.kubemaas.io"
    names = crd["spec"]["names"]
    assert (names["kind"], names["plural"], names["shortNames"]) == ("ModelService", "modelservices", ["msvc"])
    assert "kubemaas" in names["categories"]
    version = crd["spec"]["versions"][0]
    assert version["name"] == "v1alpha1" and version["served"] and version["storage"]
    assert version["subresources"]["scale"] == {
        "specReplicasPath": ".spec.replicas",
        "statusReplicasPath": ".status.replicas",
        "labelSelectorPath": ".status.selector",
    }
    assert version["subresources"]["status"] == {}


def test_printer_columns():
    columns = [c["name"] for c in build_crd()["spec"]["versions"][0]["additionalPrinterColumns"]]
    for wanted in ("Ready", "Replicas", "Available", "Variants", "GPUs", "URL", "Age", "Rollout", "Canary"):
        assert wanted in columns


def test_schema_is_structural():
    for path, node in walk(schema()):
        assert "anyOf" not in node or node.get("x-kubernetes-int-or-string"), path
        assert "$ref" not in node and "title" not in node, path
        assert node.get("additionalProperties") is not False, path
        has_type = "type" in node or node.get("x-kubernetes-int-or-string")
        assert has_type, f"{path} has no type"
        assert "nullable" not in node and "null" not in str(node.get("type")), path


def test_strings_and_lists_are_bounded_for_cel_cost():
    for path, node in walk(schema()["properties"]["spec"], ".spec"):
        if node.get("type") == "string":
            assert "maxLength" in node or "enum" in node, f"{path} string without maxLength"
        if node.get("type") == "array":
            assert "maxItems" in node, f"{path} list without maxItems"


def test_defaults_the_api_server_applies():
    spec = schema()["properties"]["spec"]["properties"]
    assert spec["replicas"]["default"] == 1
    assert spec["variants"]["default"] == [{"name": "default", "quantization": "none", "weight": 100}]
    assert spec["resources"]["default"] == {"gpu": {"count": 0, "nodes": 1}}
    assert spec["rollout"]["default"]["maxSurge"] == 1
    assert spec["resources"]["properties"]["gpu"]["properties"]["count"]["default"] == 0


def test_variants_are_a_map_list_keyed_by_name():
    variants = schema()["properties"]["spec"]["properties"]["variants"]
    assert variants["x-kubernetes-list-type"] == "map"
    assert variants["x-kubernetes-list-map-keys"] == ["name"]
    assert variants["items"]["required"][0] == "name"


def test_every_rule_is_in_the_crd():
    text = CRD_PATH.read_text()
    expected = [value for value in vars(rules).values() if isinstance(value, rules.CelRule)]
    if not rules.GPU_ONLY_QUANTIZATIONS:
        expected.remove(rules.QUANTIZATION_ON_CPU)
    found = [entry for _, node in walk(schema()) for entry in node.get("x-kubernetes-validations", [])]
    assert len(found) == len(expected)
    for rule in expected:
        assert rule.to_schema() in found, rule.message
    assert "x-kubernetes-validations" in text


def test_status_is_strict_without_kopf_fields():
    status = schema()["properties"]["status"]
    assert "x-kubernetes-preserve-unknown-fields" not in status
    assert "kopf" not in status["properties"]
    assert status["properties"]["conditions"]["x-kubernetes-list-map-keys"] == ["type"]
