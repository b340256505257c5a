"""GitOps: the Argo CD health check (Lua, run here with lupa against sample ModelServices and
against statuses the operator's own status code computes), and the Argo CD / Flux examples."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import jsonschema
import pytest
import yaml
from kubemaas_operator.builders.image import RuntimeImages
from kubemaas_operator.builders.layout import Track, VariantLayout
from kubemaas_operator.observe import Observation, compute_status
from kubemaas_operator.problem import Problem
from lupa import LuaRuntime

from tests.unit.chart import CHART, REPO

GITOPS = REPO / "docs" / "gitops"
HEALTH_LUA = GITOPS / "modelservice-health.lua"
HEALTH_KEY = "resource.customizations.health.kubemaas.io_ModelService"


def argocd_health(obj: dict[str, Any]) -> tuple[str, str]:
    """Run the script the way Argo CD does: `obj` is a global, the script returns `hs`.
    Numbers arrive as floats, as Argo CD's JSON-to-Lua conversion gives them."""
    lua = LuaRuntime(unpack_returned_tuples=True)
    as_json_numbers = json.loads(json.dumps(obj), parse_int=float)
    run = lua.eval("function(o, src) obj = o; return assert(load(src))() end")
    hs = run(lua.table_from(as_json_numbers, recursive=True), HEALTH_LUA.read_text())
    return hs["status"], hs["message"]


def ms(generation: int, status: dict[str, Any] | None) -> dict[str, Any]:
    body: dict[str, Any] = {"apiVersion": "kubemaas.io/v1alpha1", "kind": "ModelService",
                            "metadata": {"name": "m", "namespace": "ml", "generation": generation}}
    if status is not None:
        body["status"] = status
    return body


def cond(ctype: str, status: str, reason: str, generation: int = 2, message: str = "m") -> dict:
    return {"type": ctype, "status": status, "reason": reason, "message": message,
            "observedGeneration": generation, "lastTransitionTime": "2026-01-01T00:00:00Z"}


READY = cond("Ready", "True", "AllVariantsAvailable", message="2/2 replicas ready")
SAMPLES = {
    "no-status": (ms(1, None), "Progressing", "Waiting for the KubeMaaS operator"),
    "empty-status": (ms(1, {}), "Progressing", "generation 1"),
    "ready": (ms(2, {"observedGeneration": 2, "conditions": [
        READY, cond("Progressing", "False", "RolloutComplete"), cond("Degraded", "False", "AsExpected")]}),
        "Healthy", "AllVariantsAvailable: 2/2 replicas ready"),
    "ready-but-generation-lags": (ms(3, {"observedGeneration": 2, "conditions": [READY]}),
                                  "Progressing", "observe generation 3"),
    "condition-lags-status": (ms(3, {"observedGeneration": 3, "conditions": [READY]}),
                              "Progressing", "observe generation 3"),
    "rolling-out": (ms(2, {"observedGeneration": 2, "conditions": [
        cond("Ready", "False", "WaitingForReplicas", message="1/2 replicas ready."),
        cond("Progressing", "True", "RollingOut"), cond("Degraded", "False", "AsExpected")]}),
        "Progressing", "WaitingForReplicas: 1/2 replicas ready."),
    "unknown": (ms(2, {"observedGeneration": 2, "conditions": [cond("Ready", "Unknown", "Pending")]}),
                "Progressing", "Pending"),
    "no-ready-condition": (ms(2, {"observedGeneration": 2, "conditions": []}), "Progressing",
                           "Ready condition"),
    "unschedulable": (ms(2, {"observedGeneration": 2, "conditions": [
        cond("Ready", "False", "Unschedulable", message="0/5 nodes: Insufficient nvidia.com/gpu"),
        cond("Progressing", "True", "RollingOut"),
        cond("Degraded", "True", "Unschedulable", message="0/5 nodes: Insufficient nvidia.com/gpu")]}),
        "Degraded", "Unschedulable: 0/5 nodes: Insufficient nvidia.com/gpu"),
    "degraded-while-ready": (ms(2, {"observedGeneration": 2, "conditions": [
        READY, cond("Degraded", "True", "CrashLoopBackOff", message="container runtime keeps exiting")]}),
        "Degraded", "CrashLoopBackOff"),
    "canary-moving": (ms(2, {"observedGeneration": 2, "conditions": [
        cond("Ready", "True", "CanaryInProgress"), cond("Progressing", "True", "CanaryProgressing", message="step 1/2"),
        cond("Degraded", "False", "AsExpected")]}), "Progressing", "CanaryProgressing: step 1/2"),
    "canary-held": (ms(2, {"observedGeneration": 2, "conditions": [
        cond("Ready", "True", "CanaryInProgress"), cond("Progressing", "True", "CanaryHeld", message="held"),
        cond("Degraded", "False", "AsExpected")]}), "Suspended", "CanaryHeld: held"),
    "surge-unschedulable": (ms(2, {"observedGeneration": 2, "conditions": [
        cond("Ready", "False", "SurgeUnschedulable", message="a new pod cannot be scheduled"),
        cond("Progressing", "True", "RollingOut"),
        cond("Degraded", "True", "SurgeUnschedulable", message="a new pod cannot be scheduled")]}),
        "Degraded", "SurgeUnschedulable"),
    # The operator refuses a spec its models reject: only a Ready condition, no observedGeneration.
    "invalid-spec": (ms(4, {"conditions": [cond("Ready", "False", "InvalidSpec", 4, "spec.x: bad")]}),
                     "Degraded", "InvalidSpec: spec.x: bad"),
    "invalid-spec-older-generation": (
        ms(5, {"conditions": [cond("Ready", "False", "InvalidSpec", 4, "spec.x: bad")]}),
        "Progressing", "generation 5"),
}


@pytest.mark.parametrize("case", SAMPLES)
def test_health_of_sample_modelservices(case):
    obj, expected_status, expected_message = SAMPLES[case]
    status, message = argocd_health(obj)
    assert status == expected_status, message
    assert expected_message in message


PLAN = (VariantLayout("default", 100, 2, Track("m-default", "abc123", 2), quantization="none"),)


def deployment(ready: int, replicas: int = 2) -> dict:
    return {"metadata": {"name": "m-default", "generation": 1},
            "spec": {"replicas": replicas},
            "status": {"observedGeneration": 1, "replicas": replicas, "updatedReplicas": replicas,
                       "readyReplicas": ready, "availableReplicas": ready}}


OPERATOR_STATUSES = {
    "available": ({"deployments": {"m-default": deployment(2)}}, "Healthy"),
    "waiting": ({"deployments": {"m-default": deployment(1)}}, "Progressing"),
    "no-deployment-yet": ({}, "Progressing"),
    "keda-missing": ({"blocking": Problem("KedaNotInstalled", "install KEDA")}, "Degraded"),
    "image-pull": ({"deployments": {"m-default": deployment(0)}, "pods": ({"status": {
        "containerStatuses": [{"name": "runtime", "image": "x", "state": {"waiting": {
            "reason": "ImagePullBackOff", "message": "not found"}}}]}},)}, "Degraded"),
}


@pytest.mark.parametrize("case", OPERATOR_STATUSES)
def test_health_of_statuses_the_operator_writes(case):
    """The script reads what compute_status produces, not an idea of it."""
    extra, expected = OPERATOR_STATUSES[case]
    obs = Observation(name="m", namespace="ml", generation=2, selector="s", url="u",
                      runtime_image=RuntimeImages.single("img"), variants=PLAN, **extra)
    status = compute_status(obs, now=datetime(2026, 1, 1, tzinfo=UTC)).to_wire()
    assert argocd_health(ms(2, status))[0] == expected


def test_argocd_configmap_embeds_the_script():
    cm = yaml.safe_load((GITOPS / "argocd-cm.yaml").read_text())
    assert cm["kind"] == "ConfigMap" and cm["metadata"]["name"] == "argocd-cm"
    assert cm["data"][HEALTH_KEY] == HEALTH_LUA.read_text()


def chart_values_schema() -> dict:
    return json.loads((CHART / "values.schema.json").read_text())


def test_argocd_application_points_at_the_chart_with_valid_values():
    docs = list(yaml.safe_load_all((GITOPS / "argocd-application.yaml").read_text()))
    (app,) = [d for d in docs if d["spec"]["source"].get("path") == "charts/kubemaas"]
    assert (REPO / app["spec"]["source"]["path"] / "Chart.yaml").exists()
    jsonschema.validate(app["spec"]["source"]["helm"]["valuesObject"], chart_values_schema())
    assert "ServerSideApply=true" in app["spec"]["syncPolicy"]["syncOptions"]
    (models,) = [d for d in docs if d["spec"]["source"].get("path") == "examples"]
    assert (REPO / "examples" / models["spec"]["source"]["directory"]["include"]).exists()


def test_flux_helmrelease_points_at_the_chart_with_valid_values():
    docs = {d["kind"]: d for d in yaml.safe_load_all((GITOPS / "flux-helmrelease.yaml").read_text())}
    release = docs["HelmRelease"]
    chart = release["spec"]["chart"]["spec"]
    assert (REPO / chart["chart"] / "Chart.yaml").exists()
    assert chart["sourceRef"]["name"] == docs["GitRepository"]["metadata"]["name"]
    jsonschema.validate(release["spec"]["values"], chart_values_schema())
    assert (REPO / docs["Kustomization"]["spec"]["path"]).is_dir()
