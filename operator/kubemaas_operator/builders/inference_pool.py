"""Inference-aware routing (`spec.routing: inferencePool`): the Gateway API Inference Extension's
InferencePool over the model's pods, its endpoint picker (Deployment, Service, ConfigMap and a
least-privilege ServiceAccount/Role/RoleBinding, all `<name>-epp`), and the HTTPRoute whose
backend is the pool. docs/operator.md, "Inference-aware routing".

The picker's pods carry `kubemaas.io/endpoint-picker`, never `kubemaas.io/modelservice`: that
label selects the model's pods (its Services, status, PodDisruptionBudget, NetworkPolicy and the
pool itself), and the picker is not one of them. Its children still carry the ModelService
label, so pruning finds them when routing is turned off.
"""

from __future__ import annotations

from typing import Any

import yaml

from kubemaas_operator.api import ModelService
from kubemaas_operator.api.constants import PICKER_SUFFIX
from kubemaas_operator.builders.gateway import GATEWAY_GROUP, gateway_parent, route_matches
from kubemaas_operator.builders.naming import (
    MODELSERVICE_LABEL,
    child_metadata,
    common_labels,
)
from kubemaas_operator.runtime_contract import HTTP_PORT
from kubemaas_operator.settings import OperatorSettings

INFERENCE_GROUP = "inference.networking.k8s.io"
INFERENCE_API_VERSION = f"{INFERENCE_GROUP}/v1"
PICKER_LABEL = "kubemaas.io/endpoint-picker"
PICKER_GRPC_PORT = 9002  # ext-proc, what the gateway calls
PICKER_HEALTH_PORT = 9003  # gRPC health, service "inference-extension"
PICKER_METRICS_PORT = 9090
PICKER_CONFIG_DIR = "/config"
PICKER_CONFIG_FILE = "picker.yaml"
OBJECTIVE_GROUP = "inference.networking.x-k8s.io"  # InferenceObjective, which the EPP watches
# The runtime's metrics the picker (the extension's EPP, v1.2.0) scrapes from each pod, by the
# EPP flag that names each (the runtime's own names; docs/runtime.md, "Metrics"). The LoRA one is
# in vLLM's `vllm:lora_requests_info` label shape, which the EPP's parser requires.
PICKER_METRIC_FLAGS = {
    "total-queued-requests-metric": "kubemaas_num_requests_waiting",
    "kv-cache-usage-percentage-metric": "kubemaas_kv_cache_usage_ratio",
    "lora-info-metric": "kubemaas_lora_requests_info",
}
# The scheduling profile: every scorer scores each ready pod 0..1, the weighted sum decides and
# the max-score picker takes the best (ties at random). Queue depth and KV-cache use weigh as
# the extension's own default profile does; LoRA affinity prefers a pod with the request's
# adapter running, then one with room to load it.
PICKER_SCORERS = (("queue-scorer", 2), ("kv-cache-utilization-scorer", 2), ("lora-affinity-scorer", 1))


def picker_name(ms: ModelService) -> str:
    return f"{ms.name}-{PICKER_SUFFIX}"


def wants_inference_pool(ms: ModelService) -> bool:
    return ms.spec.routing == "inferencePool"


def picker_labels(ms: ModelService) -> dict[str, str]:
    """The picker's children's labels (with the ModelService's, for pruning)."""
    return {**common_labels(ms.name, "endpoint-picker"), PICKER_LABEL: ms.name}


def picker_pod_labels(ms: ModelService) -> dict[str, str]:
    """The picker pod's: without kubemaas.io/modelservice, which selects the model's pods."""
    labels = {k: v for k, v in picker_labels(ms).items() if k != MODELSERVICE_LABEL}
    return labels


def build_inference_pool(ms: ModelService) -> dict[str, Any]:
    """The pool: every ready pod of every variant on the runtime's port, picked per request by
    `<name>-epp`; FailClose, so a picker that is down refuses requests instead of spreading
    them blindly."""
    return {
        "apiVersion": INFERENCE_API_VERSION,
        "kind": "InferencePool",
        "metadata": child_metadata(ms, ms.name, common_labels(ms.name, "inference-pool")),
        "spec": {
            "selector": {"matchLabels": {MODELSERVICE_LABEL: ms.name,
                                         "app.kubernetes.io/component": "model-server"}},
            "targetPorts": [{"number": HTTP_PORT}],
            "endpointPickerRef": {
                "group": "", "kind": "Service", "name": picker_name(ms),
                "port": {"number": PICKER_GRPC_PORT}, "failureMode": "FailClose",
            },
        },
    }


def build_pool_route(ms: ModelService) -> dict[str, Any]:
    """The HTTPRoute of a routed model: its paths (the v2 path and /v1) to the pool."""
    assert ms.spec.gateway is not None  # the API server refuses routing without spec.gateway
    return {
        "apiVersion": f"{GATEWAY_GROUP}/v1",
        "kind": "HTTPRoute",
        "metadata": child_metadata(ms, ms.name, common_labels(ms.name, "route")),
        "spec": {
            "parentRefs": [gateway_parent(ms.spec.gateway)],
            "rules": [{
                "matches": route_matches(ms),
                "backendRefs": [{"group": INFERENCE_GROUP, "kind": "InferencePool", "name": ms.name}],
            }],
        },
    }


def picker_config(ms: ModelService) -> str:
    """The EPP's EndpointPickerConfig (its --config-file): the scorers, the max-score picker
    and one profile weighing them."""
    return yaml.safe_dump({
        "apiVersion": f"{OBJECTIVE_GROUP}/v1alpha1",
        "kind": "EndpointPickerConfig",
        "plugins": [*({"type": scorer} for scorer, _ in PICKER_SCORERS),
                    {"type": "max-score-picker"}, {"type": "single-profile-handler"}],
        "schedulingProfiles": [{
            "name": "default",
            "plugins": [*({"pluginRef": scorer, "weight": weight} for scorer, weight in PICKER_SCORERS),
                        {"pluginRef": "max-score-picker"}],
        }],
    }, sort_keys=False)


def picker_args(ms: ModelService) -> list[str]:
    """The EPP's flags: the pool it serves (the v1 group), its ports, the config file and the
    runtime's metric names. Plain-text gRPC (--secure-serving=false), as lwepp and the
    gateway's ext-proc cluster in docs/operator.md speak; its Prometheus port without the
    TokenReview auth, which would need cluster-scoped RBAC."""
    return [
        f"--pool-name={ms.name}", f"--pool-namespace={ms.namespace}", f"--pool-group={INFERENCE_GROUP}",
        f"--grpc-port={PICKER_GRPC_PORT}", f"--grpc-health-port={PICKER_HEALTH_PORT}",
        f"--metrics-port={PICKER_METRICS_PORT}", "--metrics-endpoint-auth=false",
        "--secure-serving=false", "--tracing=false",
        f"--config-file={PICKER_CONFIG_DIR}/{PICKER_CONFIG_FILE}",
        *(f"--{flag}={metric}" for flag, metric in PICKER_METRIC_FLAGS.items()),
    ]


def build_picker_children(ms: ModelService, settings: OperatorSettings) -> list[dict[str, Any]]:
    """ServiceAccount, Role, RoleBinding, ConfigMap, Deployment and Service of the picker."""
    name = picker_name(ms)
    labels = picker_labels(ms)
    meta = child_metadata(ms, name, labels)
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta,
         "automountServiceAccountToken": True},
        # Least privilege: it watches the pool, the objectives and the pods; it writes nothing.
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": meta,
         "rules": [
             {"apiGroups": [INFERENCE_GROUP], "resources": ["inferencepools"], "verbs": ["get", "list", "watch"]},
             {"apiGroups": [OBJECTIVE_GROUP], "resources": ["inferenceobjectives"], "verbs": ["get", "list", "watch"]},
             {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]},
         ]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": meta,
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
         "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": ms.namespace}]},
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta,
         "data": {PICKER_CONFIG_FILE: picker_config(ms)}},
        _picker_deployment(ms, settings, meta),
        {"apiVersion": "v1", "kind": "Service", "metadata": meta,
         "spec": {"selector": {PICKER_LABEL: ms.name},
                  "ports": [{"name": "grpc-ext-proc", "port": PICKER_GRPC_PORT, "targetPort": PICKER_GRPC_PORT,
                             "protocol": "TCP", "appProtocol": "http2"}]}},
    ]


def _picker_deployment(ms: ModelService, settings: OperatorSettings, meta: dict[str, Any]) -> dict[str, Any]:
    name = picker_name(ms)
    probe = {"grpc": {"port": PICKER_HEALTH_PORT, "service": "inference-extension"}, "periodSeconds": 5}
    container = {
        "name": "endpoint-picker",
        "image": settings.endpoint_picker_image,
        "args": picker_args(ms),
        "ports": [{"name": "grpc", "containerPort": PICKER_GRPC_PORT},
                  {"name": "grpc-health", "containerPort": PICKER_HEALTH_PORT},
                  {"name": "metrics", "containerPort": PICKER_METRICS_PORT}],
        "readinessProbe": probe,
        "livenessProbe": {**probe, "initialDelaySeconds": 5},
        "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "512Mi"}},
        "securityContext": {  # Pod Security "restricted"
            "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
            "runAsNonRoot": True, "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": [{"name": "config", "mountPath": PICKER_CONFIG_DIR, "readOnly": True}],
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": meta,
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {PICKER_LABEL: ms.name}},
            "template": {
                "metadata": {"labels": picker_pod_labels(ms)},
                "spec": {
                    "serviceAccountName": name,
                    "securityContext": {"runAsNonRoot": True, "runAsUser": 65532, "runAsGroup": 65532,
                                        "seccompProfile": {"type": "RuntimeDefault"}},
                    "containers": [container],
                    "volumes": [{"name": "config", "configMap": {"name": name}}],
                },
            },
        },
    }


def build_routing_children(ms: ModelService, settings: OperatorSettings) -> list[dict[str, Any]]:
    """The picker's children, then the pool, then the route (apply order: what a reference
    names exists first)."""
    return [*build_picker_children(ms, settings), build_inference_pool(ms), build_pool_route(ms)]
