"""A variant over several nodes: one KubeRay RayCluster per replica (group), planned from the pods."""

from __future__ import annotations

from dataclasses import replace

from kubemaas_operator.builders import build_children
from kubemaas_operator.builders.naming import MODELSERVICE_LABEL
from kubemaas_operator.builders.raycluster import GROUP_LABEL, GROUP_NAME_LABEL, group_name
from kubemaas_operator.builders.revision import REVISION_LABEL
from kubemaas_operator.multinode import (
    CONTROLLER_MISSING_REASON,
    plan_groups,
    surge_groups,
)
from kubemaas_operator.observed import ObservedGroup, observed_groups
from kubemaas_operator.reconcile import _NOT_INSTALLED_REASONS, decide
from kubemaas_operator.settings import OperatorSettings
from kubemaas_runtime.config import parse_serve_config

from tests.unit.support import make_ms

ON = OperatorSettings(runtime_image="registry.example.com/rt:1", multi_node=True)
OFF = OperatorSettings(runtime_image="registry.example.com/rt:1")
GPU_LABEL = ON.gpu_memory_label


def big(replicas: int = 2, **spec) -> object:
    return make_ms({
        "model": {"uri": "pvc://weights/llama-405b", "format": "transformers", "task": "text-generation",
                  "parameterCount": "405B"},
        "replicas": replicas,
        "resources": {"gpu": {"count": 8, "nodes": 2, "product": "NVIDIA-H100-80GB-HBM3"}},
        "variants": [{"name": "bf16", "quantization": "bf16"}], **spec}, name="llm")


def clusters(ms, settings=ON):
    return [c for c in decide(ms, settings, None).children if c["kind"] == "RayCluster"]


def test_each_replica_is_a_ray_cluster_and_no_deployment():
    plan = decide(big(), ON, None)
    kinds = [c["kind"] for c in plan.children]
    assert "Deployment" not in kinds and kinds[-2:] == ["RayCluster", "RayCluster"]
    (layout,) = plan.variants
    assert layout.groups == tuple(c["metadata"]["name"] for c in plan.children if c["kind"] == "RayCluster")


def test_head_runs_the_runtime_after_ray_with_pipeline_stages_over_the_nodes():
    (cluster, _) = clusters(big())
    head = cluster["spec"]["headGroupSpec"]["template"]
    assert head["metadata"]["annotations"]["ray.io/overwrite-container-cmd"] == "true"
    (container,) = head["spec"]["containers"]
    assert container["command"][:2] == ["/bin/bash", "-c"] and "KUBERAY_GEN_RAY_START_CMD" in container["command"][2]
    assert container["command"][3:] == ["kubemaas-runtime"] and container["args"][0] == "serve"
    env = {e["name"]: e["value"] for e in container["env"]}
    config = parse_serve_config(container["args"][1:], env)  # the runtime's own parser
    assert (config.engine, config.tensor_parallel_size, config.pipeline_parallel_size,
            config.distributed_executor_backend) == ("auto", 8, 2, "ray")
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "8"


def test_the_head_names_ray_metrics_apart_from_the_runtime_port():
    # KubeRay adds a "metrics" port 8080 unless the head declares one: the head Service would list
    # 8080 twice and the API server refuses it (found against the real ray-operator, e2e).
    (cluster, _) = clusters(big())
    (container,) = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert "metrics" in ports and ports["metrics"] != ports["http"]
    assert len(set(ports.values())) == len(ports)


def test_workers_join_ray_get_the_gpus_and_the_fit_affinity_but_no_traffic():
    (cluster, _) = clusters(big())
    head = cluster["spec"]["headGroupSpec"]["template"]
    (workers,) = cluster["spec"]["workerGroupSpecs"]
    assert workers["replicas"] == workers["minReplicas"] == workers["maxReplicas"] == 1
    pod = workers["template"]
    (container,) = pod["spec"]["containers"]
    assert "command" not in container and "args" not in container  # KubeRay writes ray start
    assert container["resources"] == head["spec"]["containers"][0]["resources"]
    # every node of a group needs the GPU memory: the same required affinity as the head
    assert pod["spec"]["affinity"] == head["spec"]["affinity"]
    terms = str(pod["spec"]["affinity"])
    assert GPU_LABEL in terms
    assert MODELSERVICE_LABEL not in pod["metadata"]["labels"]  # the Services never select workers
    assert pod["metadata"]["labels"][GROUP_LABEL] == "llm" == head["metadata"]["labels"][MODELSERVICE_LABEL]
    assert pod["metadata"]["labels"][GROUP_NAME_LABEL] == cluster["metadata"]["name"]


def test_scale_is_groups():
    assert len(clusters(big(replicas=3))) == 3
    assert len(clusters(big(replicas=1))) == 1


def test_group_names_fit_kuberays_pod_names_and_stay_distinct():
    a = group_name("a" * 42, "v" * 20, "0123456789", 12)
    b = group_name("a" * 42, "v" * 19 + "w", "0123456789", 12)
    assert len(a) <= 40 and len(b) <= 40 and a != b
    assert group_name("llm", "bf16", "abc", 0) == "llm-bf16-abc-0"


def _groups(ms, revision, ready, nodes=2):
    return [ObservedGroup(group_name(ms.name, "bf16", revision, i), "bf16", revision, nodes, nodes if r else 0)
            for i, r in enumerate(ready)]


def test_a_new_revision_rolls_surge_first_by_whole_groups():
    ms = big(replicas=2)
    variant = ms.spec.variants[0]
    old = _groups(ms, "old", [True, True])
    # nothing new is ready: one new group beyond, both old ones kept
    plan = plan_groups(ms, variant, 2, "new", old)
    assert plan.apply == (group_name("llm", "bf16", "new", 0),) and set(plan.keep) == {g.name for g in old}
    # the first new group is ready: the second is created, one old group goes
    first = _groups(ms, "new", [True])
    plan = plan_groups(ms, variant, 2, "new", old + first)
    assert len(plan.apply) == 2 and len(plan.keep) == 1
    # both ready: no old group kept
    plan = plan_groups(ms, variant, 2, "new", old + _groups(ms, "new", [True, True]))
    assert plan.keep == ()


def test_surge_in_groups():
    assert surge_groups("25%", 2) == 1 and surge_groups("50%", 4) == 2 and surge_groups(3, 2) == 3
    assert surge_groups(0, 2) == 1


def test_readiness_comes_from_every_pod_of_the_group():
    ready = {"type": "Ready", "status": "True"}
    labels = {GROUP_NAME_LABEL: "llm-bf16-r-0", "kubemaas.io/variant": "bf16", REVISION_LABEL: "r"}
    pods = [{"metadata": {"labels": labels}, "status": {"conditions": [ready]}},
            {"metadata": {"labels": labels}, "status": {"conditions": []}}]
    (group,) = observed_groups([], pods)
    assert (group.pods, group.ready_pods, group.ready(2)) == (2, 1, False)


def test_off_the_switch_refuses_before_any_pod():
    plan = decide(big(), OFF, None)
    assert not [c for c in plan.children if c["kind"] in ("RayCluster", "Deployment")]
    assert plan.refused is not None and plan.refused.reason == "MultiNodeNotSupported"
    assert "multiNode" in plan.refused.message


def test_a_cluster_without_kuberay_is_told_what_it_lacks():
    reason, message = _NOT_INSTALLED_REASONS["RayCluster"]
    assert reason == CONTROLLER_MISSING_REASON and "KubeRay" in message


def test_builtin_over_nodes_cannot_shard():
    ms = big(variants=[{"name": "bf16", "quantization": "bf16", "engine": "builtin"}])
    plan = decide(ms, ON, None)
    assert plan.refused is not None and plan.refused.reason == "EngineCannotShard"
    assert not clusters(ms)


def test_build_children_alone_stays_a_deployment_without_groups():
    assert [c["kind"] for c in build_children(big(), OFF) if c["kind"] in ("Deployment", "RayCluster")] == ["Deployment"]


def test_with_the_node_cache_every_pod_of_a_group_fills_its_own_nodes_copy():
    """model.cache node over two nodes: the worker, on the other node, fetches into that node's
    cache and mounts the same entry; vLLM's Ray worker reads the weights from the same path."""
    ms = make_ms({
        "model": {"uri": "hf://meta/llama-405b@0123abc", "format": "transformers",
                  "task": "text-generation", "parameterCount": "405B", "cache": "node"},
        "resources": {"gpu": {"count": 8, "nodes": 2}},
        "variants": [{"name": "bf16", "quantization": "bf16"}]}, name="llm")
    (cluster,) = clusters(ms)
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]
    (worker_group,) = cluster["spec"]["workerGroupSpecs"]
    worker = worker_group["template"]["spec"]
    for pod in (head, worker):
        (fetch,) = [c for c in pod["initContainers"] if c["name"] == "fetch-model"]
        assert "--cache" in fetch["args"]
        assert any(v["name"] == "model-cache" and "persistentVolumeClaim" in v for v in pod["volumes"])
    served = {m["mountPath"]: m for m in head["containers"][0]["volumeMounts"]}["/mnt/models"]
    joined = {m["mountPath"]: m for m in worker["containers"][0]["volumeMounts"]}["/mnt/models"]
    assert served == joined and served["readOnly"] and served["subPath"]


def test_raising_nodes_from_one_keeps_the_deployment_serving_until_the_groups_are_ready():
    """resources.gpu.nodes 1 -> 2: surge-first, as a revision rolls. The variant's Deployment
    (from when it ran on one node) is kept until as many groups are ready as it has replicas,
    then it is no longer kept (the apply's prune deletes it)."""
    from kubemaas_operator.observed import ObservedDeployment

    ms = big(replicas=2)
    old = ObservedDeployment(name="llm-bf16", variant="bf16", revision="one", replicas=2, available=2,
                             rolled_out=True)
    plan = decide(ms, ON, None, observed=[old])
    (layout,) = plan.variants
    assert len(layout.groups) == 2 and "llm-bf16" in plan.keep
    revision = layout.stable.revision
    half = [ObservedGroup(layout.groups[0], "bf16", revision, 2, 2),
            ObservedGroup(layout.groups[1], "bf16", revision, 2, 1)]
    assert "llm-bf16" in decide(ms, ON, None, observed=[old], groups=half).keep
    waiting = decide(ms, ON, None, observed=[old], groups=half).rollout
    assert waiting.phase == "Progressing" and "llm-bf16 keeps serving until 2 of its groups" in waiting.message
    ready = [replace(g, ready_pods=2) for g in half]
    assert "llm-bf16" not in decide(ms, ON, None, observed=[old], groups=ready).keep


def one_node(replicas: int = 2, **spec) -> object:
    """big() lowered to resources.gpu.nodes 1."""
    return big(replicas, resources={"gpu": {"count": 8, "nodes": 1, "product": "NVIDIA-H100-80GB-HBM3"}}, **spec)


def _left_groups(ms, ready=(True, True)):
    """The groups a variant ran over two nodes, as the one-node LIST sees them: no pods."""
    return [ObservedGroup(group_name(ms.name, "bf16", "twonode", i), "bf16", "twonode") for i in range(len(ready))]


def test_lowering_nodes_to_one_keeps_the_groups_serving_until_the_deployment_is_ready():
    """resources.gpu.nodes 2 -> 1: surge-first, the reverse of raising it. The variant's
    groups are kept until its new Deployment has rolled out with the variant's replicas
    ready, then they are no longer kept (the apply's prune deletes them)."""
    from kubemaas_operator.observed import ObservedDeployment

    ms = one_node(replicas=2)
    groups = _left_groups(ms)
    names = {g.name for g in groups}
    plan = decide(ms, ON, None, groups=groups)  # the Deployment not created yet
    (layout,) = plan.variants
    assert layout.groups is None and [c["metadata"]["name"] for c in plan.children
                                      if c["kind"] == "Deployment"] == ["llm-bf16"]
    assert names <= plan.keep
    assert plan.rollout.phase == "Progressing"
    assert "2 group(s) (RayClusters) keep serving until Deployment llm-bf16" in plan.rollout.message
    new = ObservedDeployment(name="llm-bf16", variant="bf16", revision=layout.revision, replicas=2, available=1)
    assert names <= decide(ms, ON, None, observed=[new], groups=groups).keep  # one of two ready
    earlier = replace(new, revision="crashed", available=2, rolled_out=True)  # a copy of an earlier template
    assert names <= decide(ms, ON, None, observed=[earlier], groups=groups).keep
    ready = replace(new, available=2, rolled_out=True)
    plan = decide(ms, ON, None, observed=[ready], groups=groups)
    assert not names & plan.keep and plan.rollout.message == ""


def test_a_refused_variant_on_one_node_keeps_its_groups():
    """No Deployment is written for a refused variant, so nothing replaces its groups: they keep
    serving, as a refused variant's earlier Deployment does, until the spec changes."""
    ms = one_node(variants=[{"name": "bf16", "quantization": "bf16", "engine": "builtin"}])
    groups = _left_groups(ms)
    plan = decide(ms, ON, None, groups=groups)
    assert plan.refused is not None and plan.refused.reason == "EngineCannotShard"
    assert {g.name for g in groups} <= plan.keep
    assert not [c for c in plan.children if c["kind"] == "Deployment"]


class _Kube:
    """RayClusters to LIST; records LISTs and deletes."""

    def __init__(self, clusters):
        self.clusters = clusters
        self.lists: list[tuple[str, str]] = []
        self.deleted: list[tuple[str, str]] = []

    def apply(self, obj, force=False):
        return {**obj, "metadata": {**obj["metadata"], "generation": 1}}

    def list(self, kind, namespace, selector):
        self.lists.append((kind, selector))
        return list(self.clusters) if kind == "RayCluster" else []

    def delete(self, kind, namespace, name, uid=None):
        self.deleted.append((kind, name))


def test_the_reconcile_prunes_the_groups_only_once_the_deployment_is_ready():
    """Against a recording client: the one-node ModelService's RayClusters are listed (one
    labelled LIST, no pods) and deleted only once its Deployment is ready."""
    from kubemaas_operator.observed import ObservedDeployment
    from kubemaas_operator.reconcile import Reconciler
    from kubemaas_operator.store import Store

    ms = one_node(replicas=1)
    uid = ms.metadata.uid
    name = group_name("llm", "bf16", "twonode", 0)
    cluster = {"metadata": {"name": name, "uid": "rc-uid",
                            "labels": {MODELSERVICE_LABEL: "llm", "kubemaas.io/variant": "bf16",
                                       REVISION_LABEL: "twonode", GROUP_NAME_LABEL: name},
                            "ownerReferences": [{"uid": uid, "controller": True, "kind": "ModelService"}]}}
    kube = _Kube([cluster])
    reconciler, store = Reconciler(kube, ON), Store()
    plan, _ = reconciler.reconcile(store, ms, None)
    assert ("RayCluster", name) not in kube.deleted
    assert ("RayCluster", f"{MODELSERVICE_LABEL}=llm") in kube.lists
    assert not [k for k, _ in kube.lists if k == "Pod"]  # a one-node spec needs no group pods
    revision = plan.variants[0].revision
    ready = ObservedDeployment(name="llm-bf16", variant="bf16", revision=revision, replicas=1, available=1,
                               rolled_out=True)
    reconciler.reconcile(store, ms, None, observed=[ready])
    assert ("RayCluster", name) in kube.deleted


def test_with_the_switch_off_a_one_node_modelservice_lists_no_rayclusters():
    kube = _Kube([])
    from kubemaas_operator.reconcile import Reconciler
    from kubemaas_operator.store import Store

    Reconciler(kube, OFF).reconcile(Store(), one_node(), None)
    assert not [k for k, _ in kube.lists if k == "RayCluster"]
