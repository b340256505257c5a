"""A variant over several nodes (``resources.gpu.nodes`` > 1): one KubeRay RayCluster per
replica, a *group*, named ``<name>-<variant>-<revision>-<index>``.

The head pod is the variant's pod as a Deployment would run it (labels, GPUs, the GPU-fit
affinity, probes), with the runtime started after ``ray start --head``; it runs vLLM with the
Ray executor: tensor parallel ``gpu.count`` within a node, pipeline parallel ``gpu.nodes``
across them. The ``nodes - 1`` workers are the same pod (model volume, GPUs, affinity: every
node of a group needs the GPU memory) with a container that only joins Ray; KubeRay writes its
``ray start`` command. Workers carry no ``kubemaas.io/modelservice`` label, so no Service
sends them requests; both carry ``kubemaas.io/group-of``, which status follows.
"""

from __future__ import annotations

import copy
import hashlib
from typing import Any

from kubemaas_operator.api import ModelService, Variant
from kubemaas_operator.builders.naming import (
    MODELSERVICE_LABEL,
    RUNTIME_CONTAINER,
    child_metadata,
    variant_child_name,
    variant_labels,
)
from kubemaas_operator.builders.pod import build_pod_template
from kubemaas_operator.builders.revision import REVISION_LABEL
from kubemaas_operator.settings import OperatorSettings

GROUP_LABEL = "kubemaas.io/group-of"  # the ModelService, on every pod of a group
GROUP_NAME_LABEL = "kubemaas.io/group"  # the RayCluster, on the RayCluster and its pods
KUBERAY_CLUSTER_LABEL = "ray.io/cluster"  # KubeRay's own, on every pod it creates
WORKER_CONTAINER = "ray-worker"
WORKER_GROUP = "workers"
# KubeRay names pods `<cluster>-head-xxxxx`, `<cluster>-workers-worker-xxxxx` and the head
# Service `<cluster>-head-svc`: a group name this long keeps each within 63 characters.
MAX_GROUP_NAME = 40
# KubeRay writes the `ray start` command into the head's env; with this annotation it leaves the
# container's own command alone, which starts Ray (not blocking) and then the runtime.
OVERWRITE_CMD_ANNOTATION = "ray.io/overwrite-container-cmd"
HEAD_SCRIPT = 'ulimit -n 65536; ${KUBERAY_GEN_RAY_START_CMD//--block/} && exec "$0" "$@"'


def group_name(ms_name: str, variant: str, revision: str, index: int) -> str:
    """``<name>-<variant>-<revision>-<index>``; a long ``<name>-<variant>`` is cut and marked by a
    hash of itself, so two variants never share a group name."""
    base = variant_child_name(ms_name, variant)
    tail = f"-{revision}-{index}"
    if len(base) + len(tail) > MAX_GROUP_NAME:
        digest = hashlib.sha256(base.encode()).hexdigest()[:4]
        base = f"{base[:MAX_GROUP_NAME - len(tail) - 5].rstrip('-')}-{digest}"
    return base + tail


def multi_node_env(ms: ModelService) -> list[dict[str, str]]:
    """What the head's runtime needs beyond a one-node pod: the stages over nodes and Ray."""
    return [{"name": "KUBEMAAS_PIPELINE_PARALLEL_SIZE", "value": str(ms.spec.resources.gpu.nodes)},
            {"name": "KUBEMAAS_DISTRIBUTED_EXECUTOR_BACKEND", "value": "ray"}]


def _head_template(ms: ModelService, variant: Variant, settings: OperatorSettings, image: str,
                   name: str, revision: str) -> dict[str, Any]:
    template = build_pod_template(ms, variant, settings, image)
    meta = template["metadata"]
    meta["labels"].update({REVISION_LABEL: revision, GROUP_LABEL: ms.name, GROUP_NAME_LABEL: name})
    meta["annotations"][OVERWRITE_CMD_ANNOTATION] = "true"
    container = template["spec"]["containers"][0]
    container["command"] = ["/bin/bash", "-c", HEAD_SCRIPT, *container["command"]]
    container["env"] = [*container["env"], *multi_node_env(ms)]
    return template


def _worker_template(ms: ModelService, variant: Variant, head: dict[str, Any]) -> dict[str, Any]:
    template = copy.deepcopy(head)
    meta = template["metadata"]
    meta["labels"] = {k: v for k, v in meta["labels"].items() if k != MODELSERVICE_LABEL}
    meta["annotations"] = {"kubectl.kubernetes.io/default-container": WORKER_CONTAINER}
    runtime = template["spec"]["containers"][0]
    template["spec"]["containers"] = [{
        "name": WORKER_CONTAINER, "image": runtime["image"],
        "env": [{"name": "HOME", "value": "/tmp"}],
        "resources": runtime["resources"], "securityContext": runtime["securityContext"],
        "volumeMounts": runtime["volumeMounts"],
    }]
    return template


def build_ray_cluster(ms: ModelService, variant: Variant, settings: OperatorSettings, image: str,
                      name: str, revision: str) -> dict[str, Any]:
    """The RayCluster of one group of ``variant`` at ``revision``: a head and nodes-1 workers,
    a fixed size (no Ray autoscaler: a group is as large as the model needs)."""
    head = _head_template(ms, variant, settings, image, name, revision)
    workers = ms.spec.resources.gpu.nodes - 1
    labels = {**variant_labels(ms.name, variant.name), REVISION_LABEL: revision, GROUP_NAME_LABEL: name}
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayCluster",
        "metadata": child_metadata(ms, name, labels),
        "spec": {
            "enableInTreeAutoscaling": False,
            "headGroupSpec": {"rayStartParams": {}, "template": head},
            "workerGroupSpecs": [{
                "groupName": WORKER_GROUP, "replicas": workers, "minReplicas": workers,
                "maxReplicas": workers, "rayStartParams": {},
                "template": _worker_template(ms, variant, head),
            }],
        },
    }


__all__ = ["GROUP_LABEL", "GROUP_NAME_LABEL", "RUNTIME_CONTAINER", "build_ray_cluster", "group_name"]
