"""Every built object is a valid Kubernetes 1.35 object (strict: a misspelt field fails).

ScaledObject (KEDA) and HTTPRoute (Gateway API) are CRD kinds that kubernetes-validate has no
schema for; they are skipped here and covered by field-by-field asserts in test_builders.py.
"""

from __future__ import annotations

import kubernetes_validate
import pytest
from kubemaas_operator.api import ModelService
from kubemaas_operator.builders import build_children
from kubemaas_operator.settings import OperatorSettings

from tests.unit.support import EXAMPLES, make_ms, model_services_in

K8S_VERSION = "1.35.0"
CRD_KINDS = {"ScaledObject", "HTTPRoute"}  # no built-in schema: see the module docstring

SPECS = {
    "pvc-gpu-scheduling": {
        "model": {"uri": "pvc://models/a/b", "format": "torchscript"},
        "replicas": 3,
        "resources": {"gpu": {"count": 1, "product": "NVIDIA-L4"}, "cpu": "500m", "memory": 1073741824},
        "scheduling": {"nodeSelector": {"zone": "a"},
                       "tolerations": [{"key": "spot", "operator": "Equal", "value": "yes", "effect": "NoExecute",
                                        "tolerationSeconds": 30}],
                       "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
                           "nodeSelectorTerms": [{"matchExpressions": [
                               {"key": "zone", "operator": "In", "values": ["a"]}]}]}}},
                       "priorityClassName": "high", "runtimeClassName": "nvidia"},
        "rollout": {"maxSurge": 1, "maxUnavailable": "25%"},
    },
    "hf-secret-hpa-cpu": {
        "model": {"uri": "hf://org/name", "format": "transformers", "task": "text-classification",
                  "secretRef": {"name": "hf"}},
        "resources": {"cpu": "1"},
        "autoscaling": {"metric": "cpu", "maxReplicas": 5, "target": 60, "scaleDownStabilizationSeconds": 30},
    },
    "safetensors-rps-gateway": {
        "model": {"uri": "file:///m.safetensors", "format": "safetensors", "architecture": "pkg.nets:build"},
        "autoscaling": {"metric": "rps", "minReplicas": 2, "maxReplicas": 5, "target": 60},
        "variants": [{"name": "a", "weight": 0}, {"name": "b", "quantization": "int8-dynamic", "weight": 100}],
        "gateway": {"name": "gw"},
    },
    # the node-local model cache: the local PV, its claim, the pod's claim volume and pod affinity
    "hf-node-cache": {
        "model": {"uri": "hf://org/name@abc123", "format": "transformers", "task": "feature-extraction",
                  "cache": "node"},
    },
}


def all_built_objects() -> list[tuple[str, dict]]:
    settings = OperatorSettings()
    cases: list[tuple[str, dict]] = []
    for path in EXAMPLES:
        for body in model_services_in(path):
            body.setdefault("metadata", {})["namespace"] = "ns"
            cases += [(f"{path.name}:{o['kind']}/{o['metadata']['name']}", o)
                      for o in build_children(ModelService.from_body(body), settings)]
    for label, spec in SPECS.items():
        cases += [(f"{label}:{o['kind']}/{o['metadata']['name']}", o)
                  for o in build_children(make_ms(spec), settings)]
    return cases


CASES = all_built_objects()


# ScaledObject and HTTPRoute are CRD kinds: kubernetes-validate bundles no schema for them
# (the e2e tier applies them to a cluster with their CRDs instead).
BUILTIN_CASES = [(label, o) for label, o in CASES if o["kind"] not in CRD_KINDS]


@pytest.mark.parametrize("obj", [o for _, o in BUILTIN_CASES], ids=[label for label, _ in BUILTIN_CASES])
def test_built_object_is_valid_for_kubernetes(obj):
    kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_every_builtin_kind_is_covered():
    kinds = {o["kind"] for _, o in CASES}
    assert {"Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler",
            "PersistentVolume", "PersistentVolumeClaim"} <= kinds
