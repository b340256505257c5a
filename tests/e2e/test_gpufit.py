"""The GPU-fit check on the real control plane, with the operator as a process: variants placed
on GPUs that hold them, refused (no pod at all) where none does, shown in `kubectl get -o
wide`, re-fitted surge first when a quantization changes, and re-planned when nodes change."""

from __future__ import annotations

import json
import subprocess
import threading
from typing import Any

import pytest

from tests.e2e.cluster import Cluster
from tests.e2e.msvc import (
    REPO,
    apply,
    condition,
    deployments,
    get,
    static_claim,
    wait_ready,
    wait_reason,
)

pytestmark = pytest.mark.e2e
H100 = "NVIDIA-H100-80GB-HBM3"
L4 = "NVIDIA-L4"
MEMORY = "nvidia.com/gpu.memory"


def llm(name: str, parameters: str, quantization: str, *, gpus: int = 1, product: str | None = None,
        affinity: dict | None = None, runtime: dict | None = None) -> dict[str, Any]:
    gpu: dict[str, Any] = {"count": gpus, **({"product": product} if product else {})}
    spec: dict[str, Any] = {
        "model": {"uri": "file:///opt/models/llm", "format": "transformers", "task": "text-generation",
                  "parameterCount": parameters},
        "resources": {"gpu": gpu, "cpu": "1", "memory": "4Gi"},
        "variants": [{"name": "main", "quantization": quantization, "weight": 100}],
    }
    if affinity:
        spec["scheduling"] = {"affinity": affinity}
    if runtime:
        spec["runtime"] = runtime
    return {"apiVersion": "kubemaas.io/v1alpha1", "kind": "ModelService", "metadata": {"name": name}, "spec": spec}


def node_labels(cluster: Cluster) -> dict[str, dict]:
    return {n["metadata"]["name"]: n["metadata"].get("labels", {}) for n in cluster.get_json("nodes")["items"]}


def pods_of(cluster: Cluster, namespace: str, name: str) -> list[dict]:
    return cluster.get_json("pods", "-n", namespace, "-l", f"kubemaas.io/modelservice={name}")["items"]


def running_node(cluster: Cluster, namespace: str, name: str) -> str:
    (pod,) = [p for p in pods_of(cluster, namespace, name) if not p["metadata"].get("deletionTimestamp")]
    return pod["spec"]["nodeName"]


def test_placed_on_gpus_that_hold_them_and_refused_where_none_does(cluster: Cluster, operator,
                                                                   namespace: str) -> None:
    apply(cluster, namespace, llm("b13", "13B", "bf16"))                  # 26 GB of weights: not an L4
    apply(cluster, namespace, llm("i70", "70B", "int4-weight-only"))      # 35 GB: one H100
    apply(cluster, namespace, llm("f70", "70B", "none", product=L4))      # 280 GB pinned to an L4
    labels = node_labels(cluster)
    for name in ("b13", "i70"):
        ms = wait_ready(cluster, namespace, name, timeout=120)
        (variant,) = ms["status"]["variants"]
        assert variant["gpuFit"] == "Fits"
        assert 23034 < variant["gpuMemoryMiB"] <= 81559
        node = running_node(cluster, namespace, name)
        assert labels[node]["nvidia.com/gpu.product"] == H100, node
        assert int(labels[node][MEMORY]) >= variant["gpuMemoryMiB"]
        assert ms["status"]["url"] == f"http://{name}.{namespace}.svc.cluster.local/v1"

    cond = wait_reason(cluster, namespace, "f70", "GPUMemoryInsufficient", timeout=60)
    assert cond["message"].startswith("Variant main needs ~273 GiB per GPU (70B parameters at fp32: 261 GiB")
    assert "the largest NVIDIA-L4 has 22 GiB" in cond["message"]
    ms = get(cluster, namespace, "f70")
    assert ms["status"]["variants"][0]["gpuFit"] == "Insufficient"
    assert condition(ms, "Degraded")["reason"] == "GPUMemoryInsufficient"
    assert ms["status"]["rollout"]["phase"] == "Refused"  # not Progressing: nothing is on its way
    # no pod that could never run: no Deployment at all, so nothing Pending
    assert deployments(cluster, namespace, "f70") == {}
    assert pods_of(cluster, namespace, "f70") == []
    cluster.wait_until(
        lambda: any(e["reason"] == "GPUMemoryInsufficient" and e["type"] == "Warning"
                    for e in cluster.get_json("events", "-n", namespace, "--field-selector",
                                              "involvedObject.name=f70")["items"]),
        timeout=20, what="a Warning Event GPUMemoryInsufficient")

    # kubectl get -o wide: the estimate per variant, the generative URL
    table = cluster.kubectl("get", "msvc", "-n", namespace, "-o", "wide").stdout.splitlines()
    header = table[0].split()
    assert "GPU-MEMORY" in header and "URL" in header
    rows = {line.split()[0]: line for line in table[1:]}
    assert "main ~30GiB/GPU" in rows["b13"] and f"http://b13.{namespace}.svc.cluster.local/v1" in rows["b13"]
    assert "main ~273GiB/GPU (no fit)" in rows["f70"] and "GPUMemoryInsufficient" in rows["f70"]

    # fixed in the spec (an int4 variant on the L4 is still too big: 70B at int4 is 33 GiB; two
    # H100s hold full precision): the pods come
    fixed = llm("f70", "70B", "none", gpus=4, product=H100)
    apply(cluster, namespace, fixed)
    ms = wait_ready(cluster, namespace, "f70", timeout=120)
    assert ms["status"]["variants"][0]["gpuFit"] == "Fits"


def test_two_gpus_split_on_vllm_and_builtin_refused_before_any_pod(cluster: Cluster, operator,
                                                                   namespace: str) -> None:
    """A 2-GPU bf16 variant (auto: vLLM) gets --tensor-parallel-size 2, the vLLM image and a
    /dev/shm; the same model on the builtin engine is refused with EngineCannotShard, no pod."""
    apply(cluster, namespace, llm("tp2", "70B", "bf16", gpus=2))
    apply(cluster, namespace, llm("onegpu", "70B", "bf16", gpus=2, runtime={"engine": "builtin"}))
    ms = wait_ready(cluster, namespace, "tp2", timeout=120)
    (dep,) = deployments(cluster, namespace, "tp2").values()
    pod_spec = dep["spec"]["template"]["spec"]
    (container,) = pod_spec["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["KUBEMAAS_TENSOR_PARALLEL_SIZE"] == "2" and "KUBEMAAS_ENGINE" not in env  # auto: the default
    assert container["image"] == ms["status"]["vllmRuntimeImage"] != ms["status"]["runtimeImage"]
    assert "-vllm" in container["image"]
    assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "3Gi"}} in pod_spec["volumes"]
    assert ms["status"]["variants"][0]["gpuMemoryEstimate"].endswith("per GPU, over 2 GPUs)")
    labels = node_labels(cluster)
    assert labels[running_node(cluster, namespace, "tp2")]["nvidia.com/gpu.product"] == H100

    cond = wait_reason(cluster, namespace, "onegpu", "EngineCannotShard", timeout=60)
    assert "engine builtin runs a model on one GPU" in cond["message"]
    assert "use engine: vllm or one GPU" in cond["message"]
    ms = get(cluster, namespace, "onegpu")
    assert condition(ms, "Degraded")["reason"] == "EngineCannotShard"
    assert ms["status"]["rollout"]["phase"] == "Refused"  # not on its way: nothing rolls
    assert deployments(cluster, namespace, "onegpu") == {} and pods_of(cluster, namespace, "onegpu") == []
    cluster.wait_until(
        lambda: any(e["reason"] == "EngineCannotShard" and e["type"] == "Warning"
                    for e in cluster.get_json("events", "-n", namespace, "--field-selector",
                                              "involvedObject.name=onegpu")["items"]),
        timeout=20, what="a Warning Event EngineCannotShard")

    # the fix the message names: engine vllm; the pods come, split over both GPUs
    apply(cluster, namespace, llm("onegpu", "70B", "bf16", gpus=2, runtime={"engine": "vllm"}))
    ms = wait_ready(cluster, namespace, "onegpu", timeout=120)
    assert ms["status"]["rollout"]["phase"] == "Complete"
    (dep,) = deployments(cluster, namespace, "onegpu").values()
    env = {e["name"]: e.get("value") for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert (env["KUBEMAAS_ENGINE"], env["KUBEMAAS_TENSOR_PARALLEL_SIZE"]) == ("vllm", "2")


def test_compiled_decode_gets_its_env_and_a_longer_startup_probe_and_not_on_vllm(cluster: Cluster, operator,
                                                                              namespace: str) -> None:
    """runtime.compile decode on the builtin engine: the pod is told KUBEMAAS_COMPILE=decode and
    its startup probe and progress deadline allow 120 s a graph more than the eager twin's (6
    graphs at maxNumSeqs 32); with engine vllm the API server refuses it, naming the field."""
    runtime = {"engine": "builtin", "maxNumSeqs": 32}
    apply(cluster, namespace, llm("eager", "135M", "bf16", runtime=runtime))
    apply(cluster, namespace, llm("compiled", "135M", "bf16", runtime={**runtime, "compile": "decode"}))
    budgets = {}
    for name in ("eager", "compiled"):
        ms = wait_ready(cluster, namespace, name, timeout=120)
        assert ms["spec"]["runtime"]["compile"] == ("decode" if name == "compiled" else "off")  # defaulted
        (dep,) = deployments(cluster, namespace, name).values()
        (container,) = dep["spec"]["template"]["spec"]["containers"]
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env.get("KUBEMAAS_COMPILE") == ("decode" if name == "compiled" else None), env
        probe = container["startupProbe"]
        budgets[name] = (probe["periodSeconds"] * probe["failureThreshold"], dep["spec"]["progressDeadlineSeconds"])
    assert budgets["compiled"][0] - budgets["eager"][0] == 6 * 120, budgets
    assert budgets["compiled"][1] - budgets["eager"][1] == 6 * 120, budgets

    refused = llm("compilevllm", "135M", "bf16", runtime={"engine": "vllm", "compile": "decode"})
    proc = cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(refused), check=False)
    assert proc.returncode != 0, proc.stdout
    assert "spec.runtime.compile" in proc.stderr, proc.stderr
    assert "is the builtin engine's compiled decode" in proc.stderr, proc.stderr
    assert cluster.kubectl("get", "msvc", "compilevllm", "-n", namespace, check=False).returncode != 0


def test_larger_than_a_node_refused_naming_what_would_hold_it(cluster: Cluster, operator, namespace: str) -> None:
    """405B bf16 with only L4s allowed: refused with the smallest configuration that holds it;
    over 2 nodes of 8 H100s it fits the estimate but is refused, there being no multi-node child;
    a user's node selector that rules out the H100s is honoured by the refusal."""
    apply(cluster, namespace, llm("l4-405b", "405B", "bf16", product=L4))
    cond = wait_reason(cluster, namespace, "l4-405b", "GPUMemoryInsufficient", timeout=60)
    assert ("the smallest configuration of NVIDIA-L4 that holds it: resources.gpu.count 1 x gpu.nodes 39"
            in cond["message"]), cond["message"]
    two_nodes = llm("h100-405b", "405B", "bf16", gpus=8, product=H100)
    two_nodes["spec"]["resources"]["gpu"]["nodes"] = 2
    apply(cluster, namespace, two_nodes)
    cond = wait_reason(cluster, namespace, "h100-405b", "MultiNodeNotSupported", timeout=60)
    assert "resources.gpu.nodes 2" in cond["message"] and "use gpu.nodes 1" in cond["message"]
    ms = get(cluster, namespace, "h100-405b")
    assert ms["status"]["variants"][0]["gpuFit"] == "Fits"  # ~52 GiB per GPU over 16 H100s
    assert ms["status"]["rollout"]["phase"] == "Refused"
    assert deployments(cluster, namespace, "h100-405b") == {} and pods_of(cluster, namespace, "h100-405b") == []
    # 13B bf16 fits an H100, but the user's own selector allows only the L4 node
    only_l4 = llm("sel-13b", "13B", "bf16")
    only_l4["spec"]["scheduling"] = {"nodeSelector": {"nvidia.com/gpu.product": L4}}
    apply(cluster, namespace, only_l4)
    cond = wait_reason(cluster, namespace, "sel-13b", "GPUMemoryInsufficient", timeout=60)
    assert "among the nodes scheduling.nodeSelector and affinity allow" in cond["message"]


class PodWatch:
    """`kubectl get pods --watch` in the background: when each pod was first Ready and first
    marked for deletion, in the order the API server reported it."""

    def __init__(self, cluster: Cluster, namespace: str, selector: str) -> None:
        self.proc = subprocess.Popen(
            [cluster.kubectl_path, "--kubeconfig", cluster.kubeconfig, "get", "pods", "-n", namespace,
             "-l", selector, "--watch", "-o", "json"], stdout=subprocess.PIPE, text=True)
        self.order: list[tuple[str, str]] = []  # (event, pod name): "ready" / "deleting"
        self.nodes: dict[str, str] = {}
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        decoder, buffer = json.JSONDecoder(), ""
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            buffer += line
            try:
                pod, end = decoder.raw_decode(buffer.lstrip())
            except ValueError:
                continue
            buffer = buffer.lstrip()[end:]
            name = pod["metadata"]["name"]
            if pod["spec"].get("nodeName"):
                self.nodes[name] = pod["spec"]["nodeName"]
            ready = any(c["type"] == "Ready" and c["status"] == "True"
                        for c in pod.get("status", {}).get("conditions", []))
            for event, happened in (("ready", ready), ("deleting", bool(pod["metadata"].get("deletionTimestamp")))):
                if happened and (event, name) not in self.order:
                    self.order.append((event, name))

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


def test_a_quantization_change_refits_surge_first(cluster: Cluster, operator, namespace: str) -> None:
    # prefer the L4: the int4 variant (~12 GiB per GPU) fits it; bf16 (~30 GiB) then must move
    prefer_l4 = {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
        {"weight": 100, "preference": {"matchExpressions": [
            {"key": "nvidia.com/gpu.product", "operator": "In", "values": [L4]}]}}]}}
    # the only L4 has one GPU: wait for pods of earlier tests to leave it
    cluster.wait_until(lambda: not [p for p in cluster.get_json("pods", "-A", "--field-selector",
                                                                "spec.nodeName=gpu-l4-0")["items"]],
                       timeout=120, what="the L4 node free of pods")
    apply(cluster, namespace, llm("refit", "13B", "int4-weight-only", affinity=prefer_l4))
    wait_ready(cluster, namespace, "refit", timeout=120)
    assert running_node(cluster, namespace, "refit") == "gpu-l4-0"

    watch = PodWatch(cluster, namespace, "kubemaas.io/modelservice=refit")
    try:
        cluster.wait_until(lambda: watch.order, timeout=30, what="the watch to see the running pod")
        (old,) = [name for _, name in watch.order]
        apply(cluster, namespace, llm("refit", "13B", "bf16", affinity=prefer_l4))
        ms = wait_ready(cluster, namespace, "refit", timeout=120)
        cluster.wait_until(lambda: ("deleting", old) in watch.order, timeout=60, what="the old pod to go")
    finally:
        watch.stop()
    new = running_node(cluster, namespace, "refit")
    assert node_labels(cluster)[new]["nvidia.com/gpu.product"] == H100  # off the L4 that no longer holds it
    (variant,) = ms["status"]["variants"]
    assert variant["quantization"] == "bf16" and variant["gpuMemoryMiB"] > 23034
    (new_pod,) = [n for n, node in watch.nodes.items() if node == new and n != old]
    # surge first: the new pod was Ready before the old one was told to stop
    assert watch.order.index(("ready", new_pod)) < watch.order.index(("deleting", old)), watch.order
    dep = deployments(cluster, namespace, "refit")["refit-main"]
    assert dep["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}


BIG_NODE = "gpu-b200-test"


def test_a_new_gpu_node_that_holds_a_refused_variant_gets_its_pods(cluster: Cluster, operator,
                                                                   namespace: str) -> None:
    apply(cluster, namespace, llm("fp16-70b", "70B", "fp16"))  # ~143 GiB per GPU: no GPU here holds it
    wait_reason(cluster, namespace, "fp16-70b", "GPUMemoryInsufficient", timeout=60)
    node = {
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": BIG_NODE, "annotations": {"kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0"},
                     "labels": {"kubernetes.io/hostname": BIG_NODE, "type": "kwok", "nvidia.com/gpu.present": "true",
                                "nvidia.com/gpu.product": "TEST-GPU-192GB", "nvidia.com/gpu.count": "1",
                                MEMORY: "196608"}},
        "spec": {"taints": [{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}]},
        "status": {"capacity": {"cpu": "16", "memory": "64Gi", "pods": "110", "nvidia.com/gpu": "1"},
                   "allocatable": {"cpu": "16", "memory": "64Gi", "pods": "110", "nvidia.com/gpu": "1"}},
    }
    try:
        cluster.kubectl("apply", "-f", "-", input=json.dumps(node))
        wait_ready(cluster, namespace, "fp16-70b", timeout=120)  # the node watch re-planned it
        assert running_node(cluster, namespace, "fp16-70b") == BIG_NODE
    finally:
        cluster.kubectl("delete", "node", BIG_NODE, "--wait=false", check=False)
    # the node gone, no GPU of the cluster holds it again: refused again (the Deployment it has is
    # left as it is, its pod waiting for such a GPU; docs/api.md)
    wait_reason(cluster, namespace, "fp16-70b", "GPUMemoryInsufficient", timeout=60)


def test_the_demo_examples_one_placed_one_refused(cluster: Cluster, operator, namespace: str) -> None:
    for claim in ("llm-weights",):
        static_claim(cluster, namespace, claim)
    cluster.kubectl("apply", "-n", namespace, "-f", str(REPO / "examples" / "llm-h100.yaml"),
                    "-f", str(REPO / "examples" / "refused" / "llm-70b-on-l4.yaml"))
    ms = wait_ready(cluster, namespace, "llama-70b", timeout=120)
    for dep in deployments(cluster, namespace, "llama-70b").values():  # vLLM, split over both GPUs
        (container,) = dep["spec"]["template"]["spec"]["containers"]
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert (env["KUBEMAAS_ENGINE"], env["KUBEMAAS_TENSOR_PARALLEL_SIZE"]) == ("vllm", "2")
        assert container["image"] == ms["status"]["vllmRuntimeImage"]
    fits = {v["name"]: v for v in ms["status"]["variants"]}
    assert fits["int4"]["gpuMemoryMiB"] < fits["bf16"]["gpuMemoryMiB"] <= 81559
    labels = node_labels(cluster)
    for pod in pods_of(cluster, namespace, "llama-70b"):
        assert labels[pod["spec"]["nodeName"]]["nvidia.com/gpu.product"] == H100
    cond = wait_reason(cluster, namespace, "llama-70b-l4", "GPUMemoryInsufficient", timeout=60)
    assert "the largest NVIDIA-L4 has 22 GiB" in cond["message"]
    assert pods_of(cluster, namespace, "llama-70b-l4") == []
