"""The lock-down against the real control plane, the operator as a real process with an image
allowlist: the NetworkPolicy, memory limits, emptyDir size limits and the auth token mount
applied to the cluster; a ModelService naming an image off the allowlist refused, with nothing
created for it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.e2e import msvc
from tests.e2e.cluster import Cluster
from tests.e2e.msvc import apply, deployments, get, modelservice, wait_ready, wait_reason
from tests.e2e.operator_process import OperatorProcess

pytestmark = pytest.mark.e2e
RUNTIME = "registry.example/kubemaas-runtime"


@pytest.fixture(scope="module")
def locked_operator(cluster: Cluster, crd: str) -> Iterator[OperatorProcess]:
    proc = OperatorProcess(cluster.kubeconfig, extra_env={
        "KUBEMAAS_OPERATOR_RUNTIME_IMAGE": f"{RUNTIME}:1.0",
        "KUBEMAAS_OPERATOR_ALLOWED_RUNTIME_IMAGES": f"{RUNTIME}:*,{RUNTIME}@sha256:*",
        "KUBEMAAS_OPERATOR_RUNTIME_MEMORY_LIMIT": "3Gi",
        "KUBEMAAS_OPERATOR_METRICS_NAMESPACE": "observability",
    }).start()
    try:
        yield proc
    finally:
        proc.stop()


def locked_modelservice(name: str, **kwargs) -> dict:
    ms = modelservice(name, **kwargs)
    del ms["spec"]["resources"]["memory"]  # the operator's default limit applies
    ms["spec"]["model"] = {"uri": "hf://sentence-transformers/all-MiniLM-L6-v2@c9745ed1d9f207416be6d2e6f8de32d1f16199bf",
                           "format": "transformers", "task": "feature-extraction"}
    ms["spec"]["runtime"] = {**ms["spec"].get("runtime", {}), "auth": {"secretName": f"{name}-token"}}
    ms["spec"]["network"] = {"allowedNamespaces": ["clients"]}
    return ms


def test_network_policy_limits_and_auth_are_applied(cluster: Cluster, locked_operator, namespace: str) -> None:
    cluster.kubectl("create", "secret", "generic", "guarded-token", "-n", namespace, "--from-literal=token=t0k3n")
    apply(cluster, namespace, locked_modelservice("guarded"))
    wait_ready(cluster, namespace, "guarded", timeout=120)

    policy = cluster.get_json("networkpolicy", "guarded", "-n", namespace)
    assert policy["metadata"]["ownerReferences"][0]["kind"] == "ModelService"
    assert policy["spec"]["podSelector"] == {"matchLabels": {"kubemaas.io/modelservice": "guarded"}}
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    (rule,) = policy["spec"]["ingress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": 8080}]
    (peer,) = rule["from"]
    (expression,) = peer["namespaceSelector"]["matchExpressions"]
    assert expression["key"] == "kubernetes.io/metadata.name"
    assert sorted(expression["values"]) == sorted(["clients", namespace, "observability"])

    pod = deployments(cluster, namespace, "guarded")["guarded-default"]["spec"]["template"]["spec"]
    for container in pod["containers"] + pod["initContainers"]:
        assert container["resources"]["limits"]["memory"] == "3Gi", container["name"]
    assert all(v["emptyDir"].get("sizeLimit") for v in pod["volumes"] if "emptyDir" in v)
    (runtime,) = pod["containers"]
    assert runtime["args"] == ["serve", "--auth-token-file", "/var/run/kubemaas/auth/token"]
    token_volume = next(v for v in pod["volumes"] if v["name"] == "auth-token")
    assert token_volume["secret"]["secretName"] == "guarded-token"
    # the pods the scheduler placed carry the same limits
    pods = cluster.get_json("pods", "-n", namespace, "-l", "kubemaas.io/modelservice=guarded")["items"]
    assert pods and all(p["spec"]["containers"][0]["resources"]["limits"]["memory"] == "3Gi" for p in pods)


def test_an_image_off_the_allowlist_is_refused_and_nothing_is_created(
        cluster: Cluster, locked_operator, namespace: str) -> None:
    apply(cluster, namespace, modelservice("foreign", image="docker.io/attacker/runtime:1.0"))
    cond = wait_reason(cluster, namespace, "foreign", "ImageNotAllowed")
    assert "docker.io/attacker/runtime:1.0" in cond["message"] and RUNTIME in cond["message"]
    assert deployments(cluster, namespace, "foreign") == {}
    assert cluster.get_json("pods", "-n", namespace, "-l", "kubemaas.io/modelservice=foreign")["items"] == []
    assert cluster.get_json("networkpolicy", "-n", namespace)["items"] == []


def test_switching_to_a_foreign_image_keeps_the_allowed_pods(
        cluster: Cluster, locked_operator, namespace: str) -> None:
    apply(cluster, namespace, modelservice("moving", image=f"{RUNTIME}:1.1"))
    wait_ready(cluster, namespace, "moving", timeout=120)
    apply(cluster, namespace, modelservice("moving", image="docker.io/attacker/runtime:1.0"))
    wait_reason(cluster, namespace, "moving", "ImageNotAllowed")
    image = deployments(cluster, namespace, "moving")["moving-default"]["spec"]["template"]["spec"]["containers"][0]["image"]
    assert image == f"{RUNTIME}:1.1"
    assert msvc.condition(get(cluster, namespace, "moving"), "Ready")["reason"] == "ImageNotAllowed"
