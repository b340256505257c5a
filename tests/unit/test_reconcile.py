"""The pure half of the reconcile: image pinning, ownership, stale children, the plan."""

from __future__ import annotations

import pytest
from kubemaas_operator.api import ModelService
from kubemaas_operator.builders import (
    FOLLOW_OPERATOR,
    IMAGE_POLICY_ANNOTATION,
    choose_runtime_image,
)
from kubemaas_operator.reconcile import (
    decide,
    foreign_owner,
    stale_children,
)
from kubemaas_operator.settings import OperatorSettings

SETTINGS = OperatorSettings(runtime_image="registry.example/runtime:2.0")
UID = "11111111-2222-3333-4444-555555555555"


def _ms(image: str = "", annotations: dict | None = None, replicas: int = 5) -> ModelService:
    return ModelService.from_body({
        "apiVersion": "kubemaas.io/v1alpha1", "kind": "ModelService",
        "metadata": {"name": "m", "namespace": "ns", "uid": UID, "generation": 4,
                     "annotations": annotations or {}},
        "spec": {
            "model": {"uri": "pvc://models/minilm", "format": "transformers", "task": "feature-extraction"},
            "replicas": replicas,
            "runtime": {"image": image} if image else {},
            "variants": [{"name": "a", "quantization": "none", "weight": 80},
                         {"name": "b", "quantization": "bf16", "weight": 20}],
        },
    })


@pytest.mark.parametrize(
    ("spec_image", "pinned", "annotations", "expected"),
    [
        ("", None, {}, "registry.example/runtime:2.0"),          # nothing pinned: the default
        ("", "old/runtime:1.0", {}, "old/runtime:1.0"),          # operator upgrade restarts nothing
        ("mine:3", "old/runtime:1.0", {}, "mine:3"),             # the spec decides
        ("", "old/runtime:1.0", {IMAGE_POLICY_ANNOTATION: FOLLOW_OPERATOR},
         "registry.example/runtime:2.0"),                        # explicit policy
    ],
)
def test_runtime_image_is_pinned(spec_image, pinned, annotations, expected) -> None:
    assert choose_runtime_image(_ms(spec_image, annotations), pinned, SETTINGS.runtime_image) == expected


def test_plan_splits_replicas_and_names_children() -> None:
    plan = decide(_ms(), SETTINGS, pinned_image="old/runtime:1.0")
    assert plan.key == ("ns", "m") and plan.generation == 4
    assert [(v.name, v.replicas, v.deployment) for v in plan.variants] == [("a", 4, "m-a"), ("b", 1, "m-b")]
    deployments = [c for c in plan.children if c["kind"] == "Deployment"]
    assert {d["metadata"]["name"] for d in deployments} == {"m-a", "m-b"}
    for dep in deployments:
        assert dep["spec"]["template"]["spec"]["containers"][0]["image"] == "old/runtime:1.0"
    assert plan.url.startswith("http://m.ns.svc.")


def _obj(kind: str, name: str, owner_uid: str | None, labelled: bool = True) -> dict:
    meta: dict = {"name": name, "uid": f"uid-{name}"}
    if owner_uid:
        meta["ownerReferences"] = [{"kind": "ModelService", "name": "x", "uid": owner_uid, "controller": True}]
    if labelled:
        meta["labels"] = {"kubemaas.io/modelservice": "m"}
    return {"kind": kind, "metadata": meta}


def test_foreign_owner() -> None:
    assert foreign_owner(None, UID) is None
    assert foreign_owner(_obj("Deployment", "m-a", UID), UID) is None
    assert "ModelService x" in foreign_owner(_obj("Deployment", "m-a", "someone-else"), UID)
    assert foreign_owner(_obj("Service", "m", None, labelled=False), UID)


def test_stale_children_are_only_our_undesired_ones() -> None:
    desired = tuple(decide(_ms(), SETTINGS, None).children)
    observed = [
        _obj("Deployment", "m-a", UID),               # desired: kept
        _obj("Deployment", "m-old", UID),             # a removed variant: stale
        _obj("HorizontalPodAutoscaler", "m", UID),    # autoscaling dropped: stale
        _obj("Deployment", "m-zzz", "someone-else"),  # not ours: never touched
    ]
    stale = stale_children(desired, observed, UID)
    assert {(o["kind"], o["metadata"]["name"]) for o in stale} == {
        ("Deployment", "m-old"), ("HorizontalPodAutoscaler", "m")}
