"""The operator under faults and restarts: killed mid-work, the API server gone for 20 s, an
upgrade with a new default runtime image. Each test starts its own operator process."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator

import pytest

from tests.e2e import msvc
from tests.e2e.cluster import HACK_CLUSTER, Cluster, unavailable
from tests.e2e.msvc import TWO_VARIANTS, apply, deployments, modelservice, wait_ready
from tests.e2e.operator_process import OperatorProcess

pytestmark = pytest.mark.e2e


@pytest.fixture
def fresh_operator(cluster: Cluster, crd: str) -> Iterator[list[OperatorProcess]]:
    """A list the test appends its operator processes to; all are stopped afterwards."""
    procs: list[OperatorProcess] = []
    yield procs
    for proc in procs:
        proc.stop()


def _start(cluster: Cluster, procs: list[OperatorProcess], **env: str) -> OperatorProcess:
    proc = OperatorProcess(cluster.kubeconfig, extra_env=env).start()
    procs.append(proc)
    return proc


def _all_ready(cluster: Cluster, namespace: str, count: int) -> bool:
    items = cluster.get_json("msvc", "-n", namespace)["items"]
    ready = [m for m in items
             if (c := msvc.condition(m, "Ready")) and c["status"] == "True"
             and m["status"].get("observedGeneration") == m["metadata"]["generation"]]
    return len(ready) == count


def test_sigkill_while_reconciling_50_then_restart_converges(
        cluster: Cluster, fresh_operator, namespace: str) -> None:
    first = _start(cluster, fresh_operator)
    manifests = "\n---\n".join(
        json.dumps(modelservice(f"m{i:02d}", replicas=1 + i % 2, cpu="100m",
                                memory="256Mi")) for i in range(50))
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=manifests, timeout=120)
    # kill as soon as the operator has started creating children, long before it is done
    cluster.wait_until(lambda: cluster.get_json("deployments", "-n", namespace)["items"],
                       timeout=60, interval=0.1, what="first Deployment")
    first.kill()
    assert not _all_ready(cluster, namespace, 50)

    _start(cluster, fresh_operator)
    cluster.wait_until(lambda: _all_ready(cluster, namespace, 50), timeout=240, interval=2,
                       what="all 50 ModelServices Ready after restart")
    deps = cluster.get_json("deployments", "-n", namespace)["items"]
    assert len(deps) == 50
    assert sum(d["status"].get("readyReplicas", 0) for d in deps) == sum(1 + i % 2 for i in range(50))


def test_a_variant_removed_while_the_operator_was_away_is_pruned_after_a_restart(
        cluster: Cluster, fresh_operator, namespace: str) -> None:
    """kopf's diff base lives in memory: after a restart every ModelService comes as a create,
    and one that carries a status must still be pruned (as a resume was)."""
    first = _start(cluster, fresh_operator)
    base = modelservice("away", replicas=2, variants=TWO_VARIANTS)
    apply(cluster, namespace, base)
    wait_ready(cluster, namespace, "away")
    assert set(deployments(cluster, namespace, "away")) == {"away-a", "away-b"}
    first.stop()

    apply(cluster, namespace, msvc.with_changes(base, variants=[{**TWO_VARIANTS[0], "weight": 100}]))
    _start(cluster, fresh_operator)
    cluster.wait_until(lambda: set(deployments(cluster, namespace, "away")) == {"away-a"}, timeout=60,
                       what="away-b deleted after the restart")
    wait_ready(cluster, namespace, "away")


def _local_cluster(cluster: Cluster) -> bool:
    out = subprocess.run([str(HACK_CLUSTER), "kubeconfig"], capture_output=True, text=True, check=False)
    return out.returncode == 0 and out.stdout.strip() == cluster.kubeconfig


def test_api_server_down_for_20s_then_a_change_is_reconciled(
        cluster: Cluster, fresh_operator, namespace: str) -> None:
    if not _local_cluster(cluster):
        message = "stopping the API server needs the cluster hack/cluster started"
        unavailable(message)
    proc = _start(cluster, fresh_operator)
    apply(cluster, namespace, modelservice("outage", replicas=1))
    wait_ready(cluster, namespace, "outage")

    subprocess.run([str(HACK_CLUSTER), "stop", "kube-apiserver"], check=True)
    try:
        time.sleep(20)  # the outage itself, not a wait for a result
        assert proc.healthy(), "the operator must survive an API server outage"
    finally:
        subprocess.run([str(HACK_CLUSTER), "start", "kube-apiserver"], check=True)

    cluster.kubectl("scale", "msvc", "outage", "-n", namespace, "--replicas=3", timeout=60)
    cluster.wait_until(
        lambda: deployments(cluster, namespace, "outage")["outage-default"]["spec"]["replicas"] == 3,
        timeout=120, what="the change made after the outage applied")
    wait_ready(cluster, namespace, "outage", timeout=120)


def test_operator_upgrade_with_a_new_default_image_restarts_no_model(
        cluster: Cluster, fresh_operator, namespace: str) -> None:
    old = _start(cluster, fresh_operator, KUBEMAAS_OPERATOR_RUNTIME_IMAGE="registry.example/runtime:1.0")
    apply(cluster, namespace, modelservice("pinned", replicas=2))
    ms = wait_ready(cluster, namespace, "pinned")
    assert ms["status"]["runtimeImage"] == "registry.example/runtime:1.0"
    rs_before = msvc.replicasets(cluster, namespace, "pinned")
    old.stop()

    _start(cluster, fresh_operator, KUBEMAAS_OPERATOR_RUNTIME_IMAGE="registry.example/runtime:2.0")
    apply(cluster, namespace, modelservice("fresh", replicas=1))  # a new one gets the new default
    assert wait_ready(cluster, namespace, "fresh")["status"]["runtimeImage"] == "registry.example/runtime:2.0"
    ms = wait_ready(cluster, namespace, "pinned")
    assert ms["status"]["runtimeImage"] == "registry.example/runtime:1.0"
    assert msvc.replicasets(cluster, namespace, "pinned") == rs_before
    image = deployments(cluster, namespace, "pinned")["pinned-default"]["spec"]["template"]["spec"]["containers"][0]["image"]
    assert image == "registry.example/runtime:1.0"

    # the explicit policy moves it to the operator's image
    cluster.kubectl("annotate", "msvc", "pinned", "-n", namespace,
                    "kubemaas.io/runtime-image-policy=FollowOperator")
    cluster.wait_until(
        lambda: get_image(cluster, namespace, "pinned") == "registry.example/runtime:2.0",
        timeout=60, what="image follows the operator after the policy annotation")


def get_image(cluster: Cluster, namespace: str, name: str) -> str:
    dep = deployments(cluster, namespace, name)[f"{name}-default"]
    return dep["spec"]["template"]["spec"]["containers"][0]["image"]


def test_at_rest_the_operator_writes_nothing_and_serves_metrics(
        cluster: Cluster, fresh_operator, namespace: str) -> None:
    proc = _start(cluster, fresh_operator)
    for i in range(3):
        apply(cluster, namespace, modelservice(f"rest{i}", replicas=2))
    for i in range(3):
        wait_ready(cluster, namespace, f"rest{i}")
    time.sleep(3)  # let the last status writes land

    def versions() -> dict[str, object]:
        """A ModelService's resourceVersion (only the operator and kopf write it), and for its
        children the operator's own managedFields entries: their status is the controllers'
        (the disruption controller rewrites a PDB's status when it likes), not the operator's."""
        items = cluster.get_json("msvc,deployments,services,pdb", "-n", namespace,
                                 "--show-managed-fields")["items"]
        out: dict[str, object] = {}
        for o in items:
            key = f"{o['kind']}/{o['metadata']['name']}"
            if o["kind"] == "ModelService":
                out[key] = o["metadata"]["resourceVersion"]
            else:
                out[key] = sorted((m["manager"], m["operation"], m.get("subresource", ""), m.get("time", ""))
                                  for m in o["metadata"].get("managedFields", [])
                                  if m["manager"] == "kubemaas-operator")
        assert all(out.values()), f"every object has the operator's fields: {out}"
        return out

    before = versions()
    time.sleep(10)  # an idle window: nothing may be written in it
    assert versions() == before
    # kopf's last-handled configuration is kept in memory: no annotation write per ModelService
    for m in cluster.get_json("msvc", "-n", namespace)["items"]:
        assert not [k for k in m["metadata"].get("annotations", {}) if k.startswith("kopf.kubemaas.io/")], m

    metrics = proc.metrics()
    assert 'kubemaas_operator_reconciles_total{result="applied"}' in metrics
    assert "kubemaas_operator_reconcile_duration_seconds_count" in metrics
    assert "kubemaas_operator_managed_modelservices" in metrics
