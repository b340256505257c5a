"""The operator as a real process against the real control plane: every behaviour of issue 4
that a user sees, asserted on the cluster's state."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys

import pytest
import yaml

from tests.e2e import msvc
from tests.e2e.cluster import Cluster
from tests.e2e.msvc import (
    REPO,
    TWO_VARIANTS,
    apply,
    deployments,
    get,
    modelservice,
    wait_ready,
    wait_reason,
)

pytestmark = pytest.mark.e2e
H100 = "NVIDIA-H100-80GB-HBM3"


def _render(namespace: str) -> list[dict]:
    out = subprocess.run(
        [sys.executable, "-m", "kubemaas_operator", "render", "-f", str(REPO / "examples"),
         "-n", namespace],
        check=True, capture_output=True, text=True, cwd=REPO,
    )
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def _node_labels(cluster: Cluster) -> dict[str, dict]:
    return {n["metadata"]["name"]: n["metadata"].get("labels", {})
            for n in cluster.get_json("nodes")["items"]}


def test_every_example_becomes_ready_as_render_printed_it(cluster: Cluster, operator, namespace: str) -> None:
    examples = msvc.load_examples()
    for claim in msvc.example_claims(examples):  # no provisioner here: static volumes, as make demo
        msvc.static_claim(cluster, namespace, claim)
    cluster.kubectl("apply", "-n", namespace, "-f", str(REPO / "examples"))
    for ex in examples:
        ms = wait_ready(cluster, namespace, ex["metadata"]["name"], timeout=120)
        name, model = ex["metadata"]["name"], ex["spec"]["model"]
        generative = model.get("task") == "text-generation" or model["format"] == "gguf"
        path = "/v1" if generative else f"/v2/models/{name}"
        assert ms["status"]["url"] == f"http://{name}.{namespace}.svc.cluster.local{path}"
        assert ms["status"]["readyReplicas"] == ex["spec"].get("replicas", 1)
        assert ms["status"]["runtimeImage"]

    # the children are what `render` printed
    for want in _render(namespace):
        plural = {"Deployment": "deployment", "Service": "service", "PodDisruptionBudget": "pdb",
                  "NetworkPolicy": "networkpolicy", "ConfigMap": "configmap",
                  "HorizontalPodAutoscaler": "hpa.v2.autoscaling"}[want["kind"]]
        got = cluster.get_json(plural, want["metadata"]["name"], "-n", namespace)
        assert got["metadata"]["labels"] == {**got["metadata"]["labels"], **want["metadata"]["labels"]}
        if want["kind"] == "Deployment":
            assert got["spec"]["replicas"] == want["spec"]["replicas"]
            w, g = want["spec"]["template"]["spec"], got["spec"]["template"]["spec"]
            assert g["containers"][0]["image"] == w["containers"][0]["image"]
            assert g["containers"][0]["env"] == w["containers"][0]["env"]
            assert g.get("nodeSelector") == w.get("nodeSelector")
        if want["kind"] == "HorizontalPodAutoscaler":
            assert got["spec"]["scaleTargetRef"] == want["spec"]["scaleTargetRef"]

    # pods land where their spec says: GPU pods on nodes with the product, CPU pods off GPU nodes
    labels = _node_labels(cluster)
    by_name = {ex["metadata"]["name"]: ex for ex in examples}
    pods = cluster.get_json("pods", "-n", namespace)["items"]
    assert pods
    for pod in pods:
        ex = by_name[pod["metadata"]["labels"]["kubemaas.io/modelservice"]]
        node = labels[pod["spec"]["nodeName"]]
        gpu = ex["spec"].get("resources", {}).get("gpu", {})
        if gpu.get("count", 0) > 0:
            assert node.get("nvidia.com/gpu.present") == "true"
            if gpu.get("product"):
                assert node["nvidia.com/gpu.product"] == gpu["product"]
        else:
            assert "nvidia.com/gpu.present" not in node

    # the printer columns answer "is it serving, where, how many"
    table = cluster.kubectl("get", "msvc", "-n", namespace).stdout.splitlines()
    assert table[0].split()[:6] == ["NAME", "READY", "REPLICAS", "AVAILABLE", "VARIANTS", "GPUS"]
    assert all(" True " in row for row in table[1:]), table


def test_too_many_gpus_is_reported_with_the_schedulers_reason_then_fixed(
        cluster: Cluster, operator, namespace: str) -> None:
    def chat(gpus: int) -> dict:  # a chat model: auto takes vLLM, which splits over the pod's GPUs
        body = modelservice("huge", gpus=gpus, product=H100)
        body["spec"]["model"]["task"] = "text-generation"
        return body

    apply(cluster, namespace, chat(16))
    cond = wait_reason(cluster, namespace, "huge", "Unschedulable")
    assert "Insufficient nvidia.com/gpu" in cond["message"]
    # the Event follows the status it reports (posted by the same refresh, just after)
    cluster.wait_until(
        lambda: any(e["reason"] == "Unschedulable" and e["type"] == "Warning"
                    for e in cluster.get_json("events", "-n", namespace, "--field-selector",
                                              "involvedObject.kind=ModelService")["items"]),
        timeout=20, what="a Warning Event Unschedulable")

    apply(cluster, namespace, chat(2))
    wait_ready(cluster, namespace, "huge")


@pytest.mark.parametrize(("image", "reason", "fragment"), [
    ("kubemaas.test/unpullable:1", "ImagePullFailed", "kubemaas.test/unpullable:1"),
    ("kubemaas.test/crashloop:1", "ModelLoadFailed", "no model files"),
])
def test_image_pull_and_crash_loop_have_their_own_reasons(
        cluster: Cluster, operator, namespace: str, image: str, reason: str, fragment: str) -> None:
    apply(cluster, namespace, modelservice("faulty", image=image))
    cond = wait_reason(cluster, namespace, "faulty", reason)
    assert fragment in cond["message"]
    degraded = msvc.condition(get(cluster, namespace, "faulty"), "Degraded")
    assert degraded and degraded["status"] == "True" and degraded["reason"] == reason


def test_missing_pvc_is_named(cluster: Cluster, operator, namespace: str) -> None:
    apply(cluster, namespace, modelservice("nopvc", uri="pvc://no-such-claim/minilm"))
    cond = wait_reason(cluster, namespace, "nopvc", "PersistentVolumeClaimNotFound")
    assert "no-such-claim" in cond["message"]



def _replicas(cluster: Cluster, namespace: str, name: str) -> dict[str, int]:
    return {n: d["spec"]["replicas"] for n, d in deployments(cluster, namespace, name).items()}


def test_kubectl_scale_splits_the_total_by_weight(cluster: Cluster, operator, namespace: str) -> None:
    apply(cluster, namespace, modelservice("sc", replicas=4, variants=TWO_VARIANTS))
    wait_ready(cluster, namespace, "sc")
    assert _replicas(cluster, namespace, "sc") == {"sc-a": 3, "sc-b": 1}
    cluster.kubectl("scale", "msvc", "sc", "-n", namespace, "--replicas=8")
    cluster.wait_until(lambda: _replicas(cluster, namespace, "sc") == {"sc-a": 6, "sc-b": 2},
                       timeout=30, what="deployments split 6/2")
    ms = wait_ready(cluster, namespace, "sc")
    assert ms["status"]["replicas"] == 8 and ms["spec"]["replicas"] == 8


def test_a_change_to_one_variant_rolls_out_only_that_variant(cluster: Cluster, operator, namespace: str) -> None:
    base = modelservice("ro", replicas=2, variants=TWO_VARIANTS)
    apply(cluster, namespace, base)
    first = wait_ready(cluster, namespace, "ro")
    before = {n: d["metadata"]["generation"] for n, d in deployments(cluster, namespace, "ro").items()}
    rs_before = msvc.replicasets(cluster, namespace, "ro")

    changed = msvc.with_changes(base, variants=[TWO_VARIANTS[0], {**TWO_VARIANTS[1], "quantization": "fp16"}])
    apply(cluster, namespace, changed)
    ms = wait_ready(cluster, namespace, "ro")
    assert ms["status"]["observedGeneration"] == first["metadata"]["generation"] + 1
    after = {n: d["metadata"]["generation"] for n, d in deployments(cluster, namespace, "ro").items()}
    assert after["ro-a"] == before["ro-a"], "the untouched variant must not roll"
    assert after["ro-b"] > before["ro-b"]
    new_rs = msvc.replicasets(cluster, namespace, "ro") - rs_before
    assert len(new_rs) == 1 and next(iter(new_rs)).startswith("ro-b-")

    # The promised Events (docs/operator.md, Conditions): one per change of the Ready condition
    # that a written status shows. The create may coalesce straight to Ready (no not-Ready Event
    # then); the roll always writes a not-Ready status first (the reconcile writes what its
    # apply answered: the changed Deployment not yet rolled out), then Ready again.
    def ready_events() -> list[str]:
        events = cluster.get_json("events", "-n", namespace, "--field-selector",
                                  "involvedObject.kind=ModelService,involvedObject.name=ro")["items"]
        # resourceVersion orders creations; creationTimestamp has one-second resolution
        return [e["reason"] for e in sorted(events, key=lambda e: int(e["metadata"]["resourceVersion"]))]

    def after_first_ready(reasons: list[str]) -> list[str]:
        return reasons[reasons.index("AllVariantsAvailable") + 1:] if "AllVariantsAvailable" in reasons else []

    seen: list[str] = []

    def roll_reported() -> bool:
        seen[:] = ready_events()
        return "AllVariantsAvailable" in after_first_ready(seen)

    try:
        cluster.wait_until(roll_reported, timeout=30, what="the roll's Ready Event after the create's")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; Ready Events so far: {seen}") from exc
    reasons = ready_events()
    rolled = after_first_ready(reasons)
    # not Ready during the roll: WaitingForReplicas / RollingOut, or a pod's problem while the
    # surge pod is pending on a busy cluster (Unschedulable, ...); then Ready, and nothing twice
    assert rolled[0] != "AllVariantsAvailable" and rolled[-1] == "AllVariantsAvailable", reasons
    assert all(a != b for a, b in itertools.pairwise(reasons)), reasons


def test_removing_a_variant_deletes_its_children_and_deleting_collects_all(
        cluster: Cluster, operator, namespace: str) -> None:
    base = modelservice("rm", replicas=2, variants=TWO_VARIANTS)
    apply(cluster, namespace, base)
    wait_ready(cluster, namespace, "rm")
    assert set(deployments(cluster, namespace, "rm")) == {"rm-a", "rm-b"}

    apply(cluster, namespace, msvc.with_changes(base, variants=[{**TWO_VARIANTS[0], "weight": 100}]))
    cluster.wait_until(lambda: set(deployments(cluster, namespace, "rm")) == {"rm-a"}, timeout=30,
                       what="rm-b deleted")
    cluster.wait_until(
        lambda: cluster.kubectl("get", "service", "rm-b", "-n", namespace, check=False).returncode != 0,
        timeout=30, what="service rm-b deleted")
    wait_ready(cluster, namespace, "rm")

    managed = _managed(operator)
    cluster.kubectl("delete", "msvc", "rm", "-n", namespace)
    cluster.wait_until(
        lambda: not cluster.get_json("deployments,services,pods,pdb", "-n", namespace,
                                     "-l", "kubemaas.io/modelservice=rm")["items"],
        timeout=60, what="every child collected")
    # and the operator forgot it (kopf calls no delete handler without a finalizer); lower by
    # at least one: an earlier test's namespace may still be going, its ModelServices with it
    cluster.wait_until(lambda: _managed(operator) <= managed - 1, timeout=10,
                       what="kubemaas_operator_managed_modelservices lower")


def _managed(operator) -> float:
    for line in operator.metrics().splitlines():
        if line.startswith("kubemaas_operator_managed_modelservices "):
            return float(line.split()[1])
    raise AssertionError("kubemaas_operator_managed_modelservices not served")


def test_gitops_reapply_changes_nothing_hand_edits_are_put_back_foreign_fields_kept(
        cluster: Cluster, operator, namespace: str) -> None:
    manifest = modelservice("git", replicas=2)
    apply(cluster, namespace, manifest)
    wait_ready(cluster, namespace, "git")
    dep_before = deployments(cluster, namespace, "git")["git-default"]
    rs_before = msvc.replicasets(cluster, namespace, "git")

    apply(cluster, namespace, manifest)                    # client-side apply, again
    apply(cluster, namespace, manifest, server_side=True)  # and server-side, as Argo CD/Flux do
    diff = cluster.kubectl("diff", "-n", namespace, "-f", "-", input=json.dumps(manifest), check=False)
    assert diff.returncode == 0, diff.stdout
    wait_ready(cluster, namespace, "git")
    dep_after = deployments(cluster, namespace, "git")["git-default"]
    assert dep_after["metadata"]["generation"] == dep_before["metadata"]["generation"]
    assert msvc.replicasets(cluster, namespace, "git") == rs_before

    # a foreign annotation is left alone; a hand edit of a managed field is put back
    cluster.kubectl("annotate", "deployment", "git-default", "-n", namespace, "team.example/owner=ml")
    cluster.kubectl("set", "env", "deployment/git-default", "-n", namespace, "-c", "runtime",
                    "KUBEMAAS_MAX_BATCH_SIZE=1")

    def restored() -> bool:
        dep = deployments(cluster, namespace, "git")["git-default"]
        env = {e["name"]: e.get("value") for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
        return env.get("KUBEMAAS_MAX_BATCH_SIZE") == str(manifest_batch_size(dep_before))

    cluster.wait_until(restored, timeout=30, what="hand edit put back")
    dep = deployments(cluster, namespace, "git")["git-default"]
    assert dep["metadata"]["annotations"]["team.example/owner"] == "ml"
    # the operator never wrote the spec: every manager of a spec field is a kubectl
    managed = cluster.get_json("msvc", "git", "-n", namespace, "--show-managed-fields")
    spec_managers = {m["manager"] for m in managed["metadata"]["managedFields"]
                     if "f:spec" in m.get("fieldsV1", {})}
    assert spec_managers <= {"kubectl-client-side-apply", "kubectl", "kubectl-edit"}, spec_managers


def manifest_batch_size(dep: dict) -> str:
    env = {e["name"]: e.get("value") for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
    return env["KUBEMAAS_MAX_BATCH_SIZE"]


def test_a_name_owned_by_another_modelservice_is_a_conflict(cluster: Cluster, operator, namespace: str) -> None:
    # "x" with variant "y-z" and "x-y" with variant "z" both want the Deployment "x-y-z"
    apply(cluster, namespace, modelservice("x", variants=[{"name": "y-z", "quantization": "none", "weight": 100}]))
    wait_ready(cluster, namespace, "x")
    apply(cluster, namespace, modelservice("x-y", variants=[{"name": "z", "quantization": "none", "weight": 100}]))
    cond = wait_reason(cluster, namespace, "x-y", "NameConflict")
    assert "x-y-z" in cond["message"]
    owner = deployments(cluster, namespace, "x")["x-y-z"]["metadata"]["ownerReferences"][0]
    assert owner["name"] == "x"
