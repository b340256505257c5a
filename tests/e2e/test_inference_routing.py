"""spec.routing: inferencePool against the real InferencePool CRD of the Gateway API Inference
Extension v1.6.2 (from its Go module, hack/inference-extension): the pool, the endpoint picker's
children and the HTTPRoute are created as rendered, and turning routing off prunes them.
HTTPRoute's CRD is a stand-in (the Gateway API module is not fetched here)."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator

import pytest
from kubemaas_operator.api import ModelService
from kubemaas_operator.builders import build_children
from kubemaas_operator.settings import OperatorSettings

from tests.e2e.cluster import Cluster, unavailable
from tests.e2e.msvc import REPO, apply, get, modelservice, wait_ready, wait_reason
from tests.e2e.operator_process import OperatorProcess
from tests.e2e.test_scaling_and_traffic import _crd

pytestmark = pytest.mark.e2e

PICKER_IMAGE = "registry.example/gie-epp:v1.2.0"
POOL_CRD = "inferencepools.inference.networking.k8s.io"
OBJECTIVE_CRD = "inferenceobjectives.inference.networking.x-k8s.io"
ROUTE_CRD = "httproutes.gateway.networking.k8s.io"
PICKER_KINDS = [("serviceaccount", "ServiceAccount"), ("role.rbac.authorization.k8s.io", "Role"),
                ("rolebinding.rbac.authorization.k8s.io", "RoleBinding"), ("configmap", "ConfigMap"),
                ("deployment.apps", "Deployment"), ("service", "Service")]


def install_crds(cluster: Cluster) -> None:
    """The module's InferencePool CRD and the picker's InferenceObjective CRD (hack/inference-extension)."""
    env = {**os.environ, "KUBECONFIG": cluster.kubeconfig}
    try:
        subprocess.run([str(REPO / "hack" / "inference-extension"), "crds"], check=True, env=env,
                       capture_output=True, text=True, timeout=300)
    except (subprocess.CalledProcessError, FileNotFoundError) as exc:
        message = f"the InferencePool CRD could not be installed from the Go module: {exc}"
        unavailable(message)


@pytest.fixture(scope="module")
def routing_crds(cluster: Cluster) -> Iterator[None]:
    install_crds(cluster)
    had_route_crd = cluster.kubectl("get", "crd", ROUTE_CRD, check=False).returncode == 0
    if not had_route_crd:
        cluster.kubectl("apply", "-f", "-", input=_crd("gateway.networking.k8s.io", "HTTPRoute", "httproutes", "v1"))
        cluster.kubectl("wait", "--for=condition=Established", f"crd/{ROUTE_CRD}", "--timeout=60s")
    try:
        yield
    finally:
        if not had_route_crd:  # test_scaling_and_traffic expects it absent
            cluster.kubectl("delete", "crd", ROUTE_CRD, "--ignore-not-found", check=False)


@pytest.fixture(scope="module")
def routing_operator(cluster: Cluster, crd: str, routing_crds: None) -> Iterator[OperatorProcess]:
    proc = OperatorProcess(cluster.kubeconfig,
                           extra_env={"KUBEMAAS_OPERATOR_ENDPOINT_PICKER_IMAGE": PICKER_IMAGE}).start()
    try:
        yield proc
    finally:
        proc.stop()


def routed(name: str) -> dict:
    manifest = modelservice(name, replicas=2, uri="file:///opt/kubemaas/models/smollm2.gguf")
    manifest["spec"]["model"] = {"uri": "file:///opt/kubemaas/models/smollm2.gguf", "format": "gguf"}
    manifest["spec"]["gateway"] = {"name": "public", "namespace": "gateways"}
    manifest["spec"]["routing"] = "inferencePool"
    return manifest


def rendered(cluster_obj: dict) -> dict[tuple[str, str], dict]:
    ms = ModelService.from_body(cluster_obj)
    return {(c["kind"], c["metadata"]["name"]): c
            for c in build_children(ms, OperatorSettings(endpoint_picker_image=PICKER_IMAGE),
                                    runtime_image=cluster_obj["status"]["runtimeImage"])}


def subset(expected: object, actual: object) -> bool:
    """Every field rendered is in the server's object with the same value (the server adds
    defaults and its own fields)."""
    if isinstance(expected, dict):
        return isinstance(actual, dict) and all(k in actual and subset(v, actual[k]) for k, v in expected.items())
    if isinstance(expected, list):
        return isinstance(actual, list) and len(expected) == len(actual) and all(
            subset(e, a) for e, a in zip(expected, actual, strict=True))
    return expected == actual


def test_the_pool_picker_and_route_are_created_as_rendered_then_pruned(
        cluster: Cluster, routing_operator, namespace: str) -> None:
    apply(cluster, namespace, routed("chat"))
    ms = wait_ready(cluster, namespace, "chat")
    want = rendered(ms)
    pool = cluster.get_json("inferencepools.inference.networking.k8s.io", "chat", "-n", namespace)
    assert subset(want[("InferencePool", "chat")]["spec"], pool["spec"]), json.dumps(pool["spec"])
    assert pool["metadata"]["ownerReferences"][0]["uid"] == ms["metadata"]["uid"]
    for resource, kind in PICKER_KINDS:
        obj = cluster.get_json(resource, "chat-epp", "-n", namespace)
        expected = {k: v for k, v in want[(kind, "chat-epp")].items() if k not in ("apiVersion", "kind", "metadata")}
        assert subset(expected, obj), (kind, json.dumps(obj))
        assert obj["metadata"]["ownerReferences"][0]["uid"] == ms["metadata"]["uid"]
    route = cluster.get_json("httproutes.gateway.networking.k8s.io", "chat", "-n", namespace)
    assert route["spec"]["rules"][0]["backendRefs"] == [
        {"group": "inference.networking.k8s.io", "kind": "InferencePool", "name": "chat"}]

    # the picker is not one of the model's pods: Ready counts only the variant's two
    assert get(cluster, namespace, "chat")["status"]["replicas"] == 2

    off = routed("chat")
    del off["spec"]["routing"]
    apply(cluster, namespace, off)

    def pruned() -> bool:
        left = cluster.kubectl("get", "inferencepools.inference.networking.k8s.io,deployment,service,configmap,"
                               "serviceaccount,role,rolebinding", "-n", namespace, "-o", "name").stdout.split()
        return not any(n.endswith("/chat") and n.startswith("inferencepool") for n in left) and not any(
            n.endswith("/chat-epp") for n in left)
    cluster.wait_until(pruned, timeout=60, what="routing children pruned")
    route = cluster.get_json("httproutes.gateway.networking.k8s.io", "chat", "-n", namespace)
    assert [b["name"] for b in route["spec"]["rules"][0]["backendRefs"]] == ["chat-default"]


def test_the_real_crd_refuses_what_the_v1_schema_forbids(cluster: Cluster, routing_crds, namespace: str) -> None:
    """The CRD in the API server is the module's own: a pool without targetPorts is refused."""
    bad = {"apiVersion": "inference.networking.k8s.io/v1", "kind": "InferencePool",
           "metadata": {"name": "bad", "namespace": namespace},
           "spec": {"selector": {"matchLabels": {"a": "b"}}, "endpointPickerRef": {"name": "x", "port": {"number": 9002}}}}
    result = cluster.kubectl("apply", "-f", "-", input=json.dumps(bad), check=False)
    assert result.returncode != 0 and "targetPorts" in result.stderr, result.stderr


def test_a_missing_objective_crd_is_reported_and_the_picker_waits_for_it(
        cluster: Cluster, routing_operator, namespace: str) -> None:
    """v1.2.0's picker does not start without the InferenceObjective CRD: the operator says so
    instead of writing a picker that would crash-loop, and writes it once the CRD is back."""
    cluster.kubectl("delete", "crd", OBJECTIVE_CRD, "--wait=true", timeout=120)
    try:
        apply(cluster, namespace, routed("late"))
        cond = wait_reason(cluster, namespace, "late", "InferenceObjectiveNotInstalled")
        assert OBJECTIVE_CRD in cond["message"] and "hack/inference-extension crds" in cond["message"]
        assert cluster.kubectl("get", "deployment", "late-default", "-n", namespace, check=False).returncode == 0
        for resource in ("deployment", "inferencepools.inference.networking.k8s.io"):
            name = "late-epp" if resource == "deployment" else "late"
            assert cluster.kubectl("get", resource, name, "-n", namespace, check=False).returncode != 0
    finally:
        install_crds(cluster)
    ms = wait_ready(cluster, namespace, "late", timeout=120)  # the blocked reconcile retries
    assert ms["status"]["replicas"] == 2
    cluster.get_json("inferencepools.inference.networking.k8s.io", "late", "-n", namespace)
    cluster.get_json("deployment", "late-epp", "-n", namespace)
