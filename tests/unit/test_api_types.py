"""The API types: defaults, each cross-field validator, error paths, the wire shape."""

from __future__ import annotations

import pytest
from kubemaas_operator.api import ModelService, describe_errors, field_path
from pydantic import ValidationError

from tests.unit.support import make_body, make_ms


def errors_of(spec: dict, **kwargs) -> list[str]:
    with pytest.raises(ValidationError) as info:
        ModelService.from_body(make_body(spec, **kwargs))
    return describe_errors(info.value)


def test_defaults_fill_a_minimal_spec():
    spec = make_ms().spec
    assert spec.replicas == 1
    assert [(v.name, v.quantization, v.weight) for v in spec.variants] == [("default", "none", 100)]
    assert spec.resources.gpu.count == 0 and spec.resources.gpu.product is None
    assert spec.runtime.image == "" and spec.runtime.max_batch_size == 32 and spec.runtime.batch_timeout_ms == 0
    assert spec.rollout.strategy == "RollingUpdate"
    assert (spec.rollout.max_surge, spec.rollout.max_unavailable) == (1, 0)  # surge first
    assert spec.autoscaling is None and spec.gateway is None
    assert spec.uses_gpu is False


def test_models_are_frozen():
    ms = make_ms()
    with pytest.raises(ValidationError):
        ms.spec.replicas = 3  # type: ignore[misc]


def test_camel_case_on_the_wire_and_round_trip():
    ms = make_ms({"autoscaling": {"minReplicas": 2, "maxReplicas": 4, "target": 8},
                  "model": {"uri": "s3://bucket/m", "format": "torchscript", "secretRef": {"name": "creds"}}})
    wire = ms.to_wire()
    assert wire["spec"]["autoscaling"]["minReplicas"] == 2
    assert wire["spec"]["model"]["secretRef"] == {"name": "creds"}
    assert ModelService.from_body(wire) == ms


def test_snake_case_names_are_accepted_too():
    ms = make_ms({"runtime": {"max_batch_size": 8}})
    assert ms.spec.runtime.max_batch_size == 8


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ({"variants": [{"name": "a", "weight": 60}, {"name": "b", "weight": 30}]},
         "spec.variants: variants: the weights must sum to 100"),
        ({"variants": [{"name": "a", "weight": 50}, {"name": "a", "weight": 50}]},
         'spec.variants[1]: Duplicate value: variant name "a"'),
        ({"autoscaling": {"minReplicas": 3, "maxReplicas": 2, "target": 1}},
         "spec.autoscaling.minReplicas: autoscaling.minReplicas must be less than or equal"),
        ({"autoscaling": {"minReplicas": 0, "maxReplicas": 2, "target": 1}},
         "spec.autoscaling.minReplicas: autoscaling.minReplicas 0 (scale to zero) needs autoscaling.engine keda"),
        ({"resources": {"cpu": "1"}, "autoscaling": {"engine": "keda", "minReplicas": 0, "maxReplicas": 2,
                                                     "metric": "cpu", "target": 50}},
         "spec.autoscaling.minReplicas: autoscaling.minReplicas 0 (scale to zero) needs a request metric"),
        ({"autoscaling": {"maxReplicas": 2, "metric": "cpu", "target": 50}},
         "spec.autoscaling.metric: autoscaling.metric cpu needs resources.cpu"),
        ({"resources": {"gpu": {"count": 0, "product": "NVIDIA-L4"}}},
         "spec.resources.gpu.product: resources.gpu.product names a GPU model"),
        ({"resources": {"gpu": {"count": 1}}, "variants": [{"name": "q", "quantization": "int8-dynamic"}]},
         "spec.variants: variants: quantization int8-dynamic runs only on CPU"),
        ({"model": {"uri": "gs://b/m", "format": "torchscript"}},
         "spec.model.uri: model.uri: unimplemented scheme"),
        ({"model": {"uri": "pvc://Bad_Claim", "format": "torchscript"}},
         "spec.model.uri: model.uri must look like"),
        ({"model": {"uri": "file:///m.safetensors", "format": "safetensors"}},
         "spec.model.architecture: model.architecture (pkg.module:factory) is required"),
        ({"model": {"uri": "file:///m", "format": "transformers"}},
         "spec.model.task: model.task (feature-extraction, text-classification or text-generation) is required"),
        ({"model": {"uri": "file:///m.pt", "format": "torchscript", "task": "text-classification"}},
         "spec.model.task: model.task applies only to model.format transformers or gguf"),
        ({"rollout": {"maxSurge": "0%", "maxUnavailable": 0}},
         "spec.rollout.maxSurge: rollout.maxSurge and rollout.maxUnavailable cannot both be 0"),
        ({"rollout": {"steps": [{"weight": 10}]}},
         "spec.rollout.steps: rollout.steps applies only to rollout.strategy Canary"),
        ({"variants": [{"name": "a", "weight": 101}]}, "spec.variants[0].weight: Input should be less than"),
        ({"resources": {"memory": "8GB"}}, "spec.resources.memory: String should match pattern"),
        ({"replica": 2}, "spec.replica: Extra inputs are not permitted"),
    ],
    ids=lambda value: None,
)
def test_each_rule_refuses_with_the_field_named(spec, expected):
    lines = errors_of(spec)
    assert any(line.startswith(expected) for line in lines), lines


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("x" * 43, "metadata.name: metadata.name must be at most 42 characters"),
        ("9lives", "metadata.name: metadata.name must be a DNS label"),
        ("a.b", "metadata.name: metadata.name must be a DNS label"),
    ],
)
def test_root_rules_on_the_name(name, expected):
    assert any(line.startswith(expected) for line in errors_of({}, name=name))


@pytest.mark.parametrize(
    "spec",
    [
        {"resources": {"gpu": {"count": 2, "product": "NVIDIA-H100-80GB-HBM3"}, "cpu": 2, "memory": "8Gi"}},
        {"resources": {"cpu": "500m"}, "autoscaling": {"metric": "cpu", "maxReplicas": 3, "target": 70}},
        {"autoscaling": {"engine": "keda", "minReplicas": 0, "maxReplicas": 3, "metric": "rps", "target": 5},
         "gateway": {"name": "public"}},
        {"model": {"uri": "pvc://models", "format": "torchscript"}},
        {"model": {"uri": "pvc://models/a/b.pt", "format": "torchscript"}},
        {"model": {"uri": "hf://org/name@v1.0", "format": "transformers", "task": "text-classification"}},
        {"model": {"uri": "file:///m.safetensors", "format": "safetensors", "architecture": "pkg.nets:build"}},
        {"rollout": {"strategy": "Canary", "steps": [{"weight": 10}, {"weight": 50, "pauseSeconds": 0}]}},
        {"variants": [{"name": "a", "quantization": "bf16", "weight": 0}, {"name": "b", "weight": 100}]},
        {"scheduling": {"nodeSelector": {"zone": "a"}, "tolerations": [{"key": "k", "operator": "Exists"}],
                        "affinity": {"nodeAffinity": {}}, "priorityClassName": "high"}},
        {"gateway": {"name": "public", "namespace": "gateways"}},
    ],
)
def test_valid_specs_are_accepted(spec):
    make_ms(spec)


def test_field_path_formats_indexes_and_skips_union_tags():
    assert field_path(("spec", "variants", 1, "weight")) == "spec.variants[1].weight"
    assert field_path(("spec", "resources", "cpu", "constrained-str")) == "spec.resources.cpu"
    assert field_path(("spec", "rollout", "maxSurge", "function-after[x]", "int")) == "spec.rollout.maxSurge"
