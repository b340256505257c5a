"""Autoscalers on the ModelService's /scale, GitOps without replicas, and optional CRD kinds
(KEDA, Gateway API) reported when missing and used once installed (fixture-installed CRDs)."""

from __future__ import annotations

import json
import time

import pytest

from tests.e2e.cluster import Cluster
from tests.e2e.msvc import REPO, apply, deployments, get, modelservice, wait_ready, wait_reason

pytestmark = pytest.mark.e2e

VARIANTS = [{"name": "main", "quantization": "none", "weight": 80},
            {"name": "lite", "quantization": "bf16", "weight": 20}]


def _replicas(cluster: Cluster, namespace: str, name: str) -> dict[str, int]:
    return {n: d["spec"]["replicas"] for n, d in deployments(cluster, namespace, name).items()}


def test_hpa_targets_the_modelservice_and_scale_writes_are_not_fought(
        cluster: Cluster, operator, namespace: str) -> None:
    manifest = modelservice("auto", replicas=2, variants=VARIANTS)
    manifest["spec"]["autoscaling"] = {"engine": "hpa", "minReplicas": 1, "maxReplicas": 10,
                                       "metric": "concurrency", "target": 8}
    apply(cluster, namespace, manifest, server_side=True)
    wait_ready(cluster, namespace, "auto")
    hpa = cluster.get_json("hpa.v2.autoscaling", "auto", "-n", namespace)
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "kubemaas.io/v1alpha1",
                                            "kind": "ModelService", "name": "auto"}

    # an autoscaler writes /scale: the Deployments follow, split by weight
    cluster.kubectl("patch", "msvc", "auto", "-n", namespace, "--subresource=scale",
                    "--type=merge", "-p", '{"spec":{"replicas":5}}', "--field-manager=hpa-stand-in")
    cluster.wait_until(lambda: _replicas(cluster, namespace, "auto") == {"auto-main": 4, "auto-lite": 1},
                       timeout=30, what="deployments 4/1")
    # GitOps re-applies the manifest with replicas left out: nothing moves back
    gitops = json.loads(json.dumps(manifest))
    del gitops["spec"]["replicas"]
    apply(cluster, namespace, gitops, server_side=True)
    time.sleep(5)  # a window for anything that would fight to act
    assert get(cluster, namespace, "auto")["spec"]["replicas"] == 5
    assert _replicas(cluster, namespace, "auto") == {"auto-main": 4, "auto-lite": 1}
    assert wait_ready(cluster, namespace, "auto")["status"]["replicas"] == 5


def _crd(group: str, kind: str, plural: str, version: str) -> str:
    return json.dumps({
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        # *.k8s.io groups need the approval annotation, as the real Gateway API CRDs carry
        "metadata": {"name": f"{plural}.{group}",
                     "annotations": {"api-approved.kubernetes.io": "https://github.com/kubernetes-sigs/gateway-api"}},
        "spec": {"group": group, "scope": "Namespaced",
                 "names": {"kind": kind, "plural": plural, "singular": kind.lower()},
                 "versions": [{"name": version, "served": True, "storage": True,
                               "schema": {"openAPIV3Schema": {
                                   "type": "object", "x-kubernetes-preserve-unknown-fields": True}}}]},
    })


@pytest.mark.parametrize(("kind", "group", "plural", "version", "reason"), [
    ("HTTPRoute", "gateway.networking.k8s.io", "httproutes", "v1", "GatewayAPINotInstalled"),
    ("ScaledObject", "keda.sh", "scaledobjects", "v1alpha1", "KedaNotInstalled"),
])
def test_a_missing_crd_is_reported_then_used_once_installed(
        cluster: Cluster, operator, namespace: str, kind: str, group: str, plural: str,
        version: str, reason: str) -> None:
    crd_name = f"{plural}.{group}"
    cluster.kubectl("delete", "crd", crd_name, "--ignore-not-found", "--wait=true", timeout=120)
    manifest = modelservice("opt", replicas=2, variants=VARIANTS)
    if kind == "HTTPRoute":
        manifest["spec"]["gateway"] = {"name": "public", "namespace": "gateways"}
    else:
        manifest["spec"]["autoscaling"] = {"engine": "keda", "minReplicas": 1, "maxReplicas": 6,
                                           "metric": "concurrency", "target": 8}
    apply(cluster, namespace, manifest)
    cond = wait_reason(cluster, namespace, "opt", reason)
    assert crd_name in cond["message"]

    cluster.kubectl("apply", "-f", "-", input=_crd(group, kind, plural, version))
    try:
        cluster.kubectl("wait", "--for=condition=Established", f"crd/{crd_name}", "--timeout=60s")
        wait_ready(cluster, namespace, "opt", timeout=90)  # the blocked reconcile retries
        child = cluster.get_json(f"{plural}.{group}", "opt", "-n", namespace)
        owner = child["metadata"]["ownerReferences"][0]
        assert (owner["kind"], owner["name"], owner["controller"]) == ("ModelService", "opt", True)
        if kind == "HTTPRoute":
            backends = child["spec"]["rules"][0]["backendRefs"]
            assert {(b["name"], b["weight"]) for b in backends} == {("opt-main", 80), ("opt-lite", 20)}
            assert child["spec"]["parentRefs"][0]["name"] == "public"
        else:
            assert child["spec"]["scaleTargetRef"]["kind"] == "ModelService"
            assert child["spec"]["scaleTargetRef"]["name"] == "opt"
            assert child["spec"]["triggers"][0]["type"] == "prometheus"
        status = get(cluster, namespace, "opt")["status"]
        assert [v["weight"] for v in status["variants"]] == [80, 20]
    finally:
        cluster.kubectl("delete", "msvc", "opt", "-n", namespace, "--wait=true", check=False)
        cluster.kubectl("delete", "crd", crd_name, "--ignore-not-found", check=False)


def test_the_scale_to_zero_example_wakes_on_the_gateways_requests(
        cluster: Cluster, operator, namespace: str) -> None:
    crds = [("scaledobjects.keda.sh", _crd("keda.sh", "ScaledObject", "scaledobjects", "v1alpha1")),
            ("httproutes.gateway.networking.k8s.io",
             _crd("gateway.networking.k8s.io", "HTTPRoute", "httproutes", "v1"))]
    for name, body in crds:
        cluster.kubectl("apply", "-f", "-", input=body)
        cluster.kubectl("wait", "--for=condition=Established", f"crd/{name}", "--timeout=60s")
    try:
        cluster.kubectl("apply", "-n", namespace, "-f", str(REPO / "examples" / "addons" / "keda-scale-to-zero.yaml"))
        wait_ready(cluster, namespace, "minilm-scale-to-zero", timeout=90)
        scaled = cluster.get_json("scaledobjects.keda.sh", "minilm-scale-to-zero", "-n", namespace)
        assert scaled["spec"]["minReplicaCount"] == 0
        assert scaled["spec"]["scaleTargetRef"]["kind"] == "ModelService"
        triggers = {t.get("name", "load"): t for t in scaled["spec"]["triggers"]}
        assert "kubemaas_inflight_requests" in triggers["load"]["metadata"]["query"]
        activation = triggers["activation"]["metadata"]
        assert activation["activationThreshold"] == "0"
        assert f"httproute/{namespace}/minilm-scale-to-zero/" in activation["query"]
        # KEDA scales the model to zero through /scale: no pod is left, nothing fights it
        cluster.kubectl("patch", "msvc", "minilm-scale-to-zero", "-n", namespace, "--subresource=scale",
                        "--type=merge", "-p", '{"spec":{"replicas":0}}', "--field-manager=keda-stand-in")
        cluster.wait_until(lambda: _replicas(cluster, namespace, "minilm-scale-to-zero")
                           == {"minilm-scale-to-zero-default": 0}, timeout=30, what="scaled to zero")
        ms = wait_ready(cluster, namespace, "minilm-scale-to-zero")
        assert ms["status"]["replicas"] == 0
    finally:
        cluster.kubectl("delete", "msvc", "--all", "-n", namespace, "--wait=true", check=False)
        for name, _ in crds:
            cluster.kubectl("delete", "crd", name, "--ignore-not-found", check=False)
