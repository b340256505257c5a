"""The pure builders, one case per behaviour (ARCHITECTURE.md, issue 3)."""

from __future__ import annotations

import copy

import pytest
from kubemaas_operator.api import ModelService
from kubemaas_operator.builders import FOLLOW_OPERATOR, IMAGE_POLICY_ANNOTATION, build_children
from kubemaas_operator.builders.naming import PLACEHOLDER_UID
from kubemaas_operator.settings import OperatorSettings

from tests.unit.support import make_ms

SETTINGS = OperatorSettings()
IMAGE = "registry.example/kubemaas-runtime@sha256:abc"
GPU = {"resources": {"gpu": {"count": 2, "product": "NVIDIA-H100-80GB-HBM3"}, "cpu": "4", "memory": "16Gi"}}
TWO_VARIANTS = {
    "replicas": 5,
    "variants": [{"name": "bf16", "quantization": "bf16", "weight": 80},
                 {"name": "int8", "quantization": "int8-weight-only", "weight": 20}],
}


def children(spec: dict | None = None, **kwargs) -> list[dict]:
    return build_children(make_ms(spec, **kwargs), SETTINGS, runtime_image=IMAGE)


def find(objs: list[dict], kind: str, name: str | None = None) -> dict:
    matches = [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(matches) == 1, [(o["kind"], o["metadata"]["name"]) for o in objs]
    return matches[0]


def pod(spec: dict | None = None, variant: str = "default") -> dict:
    return find(children(spec), "Deployment", f"m-{variant}")["spec"]["template"]["spec"]


def container(spec: dict | None = None, variant: str = "default") -> dict:
    return pod(spec, variant)["containers"][0]


def env(spec: dict | None = None, variant: str = "default") -> dict[str, str]:
    return {e["name"]: e["value"] for e in container(spec, variant)["env"]}


# --- which children ---------------------------------------------------------------------

@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ({}, [("Deployment", "m-default"), ("Service", "m"), ("Service", "m-default")]),
        (TWO_VARIANTS, [("Deployment", "m-bf16"), ("Deployment", "m-int8"), ("Service", "m"),
                        ("Service", "m-bf16"), ("Service", "m-int8"), ("PodDisruptionBudget", "m")]),
        ({"autoscaling": {"maxReplicas": 3, "target": 4}},
         [("Deployment", "m-default"), ("Service", "m"), ("Service", "m-default"),
          ("PodDisruptionBudget", "m"), ("HorizontalPodAutoscaler", "m")]),
        ({"autoscaling": {"engine": "keda", "minReplicas": 1, "maxReplicas": 1, "target": 4}},
         [("Deployment", "m-default"), ("Service", "m"), ("Service", "m-default"), ("ScaledObject", "m")]),
        ({"gateway": {"name": "gw"}},
         [("Deployment", "m-default"), ("Service", "m"), ("Service", "m-default"), ("HTTPRoute", "m")]),
    ],
    ids=["minimal", "variants", "hpa", "keda", "gateway"],
)
def test_children_by_spec(spec, expected):
    assert [(o["kind"], o["metadata"]["name"]) for o in children(spec)] == [("NetworkPolicy", "m"), *expected]


def test_build_is_pure_and_never_mutates_its_input():
    ms = make_ms({**TWO_VARIANTS, "scheduling": {"affinity": {"nodeAffinity": {"x": 1}}}})
    before = copy.deepcopy(ms.to_wire())
    first = build_children(ms, SETTINGS, runtime_image=IMAGE)
    find(first, "Deployment", "m-bf16")["spec"]["template"]["spec"]["affinity"]["nodeAffinity"]["x"] = 2
    again = build_children(ms, SETTINGS, runtime_image=IMAGE)
    assert find(again, "Deployment", "m-bf16")["spec"]["template"]["spec"]["affinity"] == {"nodeAffinity": {"x": 1}}
    assert ms.to_wire() == before


# --- every child ------------------------------------------------------------------------

def test_every_child_has_namespace_labels_and_controller_owner():
    for obj in children({**TWO_VARIANTS, "autoscaling": {"maxReplicas": 9, "target": 1}, "gateway": {"name": "g"}}):
        meta = obj["metadata"]
        assert meta["namespace"] == "ns"
        assert meta["labels"]["kubemaas.io/modelservice"] == "m"
        assert meta["labels"]["app.kubernetes.io/managed-by"] == "kubemaas-operator"
        assert meta["labels"]["app.kubernetes.io/part-of"] == "kubemaas"
        assert meta["labels"]["app.kubernetes.io/instance"] == "m"
        assert meta["ownerReferences"] == [{
            "apiVersion": "kubemaas.io/v1alpha1", "kind": "ModelService", "name": "m", "uid": "uid-1",
            "controller": True, "blockOwnerDeletion": True}]


def test_owner_uid_is_a_placeholder_offline():
    assert children(uid=None)[0]["metadata"]["ownerReferences"][0]["uid"] == PLACEHOLDER_UID


# --- Deployment ---------------------------------------------------------------------------

def test_deployment_replicas_follow_the_weights():
    objs = children(TWO_VARIANTS)
    assert find(objs, "Deployment", "m-bf16")["spec"]["replicas"] == 4
    assert find(objs, "Deployment", "m-int8")["spec"]["replicas"] == 1


def test_deployment_selector_and_pod_labels_name_the_variant():
    deploy = find(children(TWO_VARIANTS), "Deployment", "m-int8")
    assert deploy["spec"]["selector"]["matchLabels"] == {"kubemaas.io/modelservice": "m", "kubemaas.io/variant": "int8"}
    labels = deploy["spec"]["template"]["metadata"]["labels"]
    assert labels["kubemaas.io/variant"] == "int8" and labels["app.kubernetes.io/component"] == "model-server"


def test_rollout_settings_reach_the_deployment_strategy():
    deploy = find(children({"rollout": {"maxSurge": 1, "maxUnavailable": "10%"}}), "Deployment")
    assert deploy["spec"]["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": "10%"}}


def test_runtime_image_is_the_callers_choice():
    assert container()["image"] == IMAGE


@pytest.mark.parametrize(
    ("spec_image", "pinned", "annotations", "expected"),
    [("", None, {}, SETTINGS.runtime_image), ("", "pinned:1", {}, "pinned:1"), ("spec:2", "pinned:1", {}, "spec:2"),
     ("", "pinned:1", {IMAGE_POLICY_ANNOTATION: FOLLOW_OPERATOR}, SETTINGS.runtime_image)],
)
def test_render_pins_the_image_as_the_operator_does(spec_image, pinned, annotations, expected):
    """build_children without an image (what `render` calls) follows the operator's one policy,
    with status as the pin and the FollowOperator annotation honoured."""
    body = make_ms({"runtime": {"image": spec_image}}).to_wire()
    body["metadata"]["annotations"] = annotations
    if pinned:
        body["status"] = {"runtimeImage": pinned}
    ms = ModelService.from_body(body)
    deployment = next(c for c in build_children(ms, SETTINGS) if c["kind"] == "Deployment")
    assert deployment["spec"]["template"]["spec"]["containers"][0]["image"] == expected


def test_container_runs_serve_with_the_kubemaas_env():
    c = container({**TWO_VARIANTS, **GPU, "runtime": {"maxBatchSize": 8, "batchTimeoutMs": 5, "maxDrift": 0.1}}, "int8")
    assert (c["command"], c["args"]) == (["kubemaas-runtime"], ["serve"])
    values = {e["name"]: e["value"] for e in c["env"]}
    assert values["KUBEMAAS_MODEL_URI"] == "file:///models/m"
    assert values["KUBEMAAS_FORMAT"] == "transformers" and values["KUBEMAAS_TASK"] == "feature-extraction"
    assert values["KUBEMAAS_NAME"] == "m" and values["KUBEMAAS_VARIANT"] == "int8"
    assert values["KUBEMAAS_QUANTIZATION"] == "int8-weight-only" and values["KUBEMAAS_DEVICE"] == "cuda"
    assert values["KUBEMAAS_MAX_BATCH_SIZE"] == "8" and values["KUBEMAAS_BATCH_TIMEOUT_MS"] == "5"
    assert values["KUBEMAAS_MAX_DRIFT"] == "0.1" and values["KUBEMAAS_PORT"] == "8080"


def test_cpu_only_runs_on_cpu_and_leaves_optional_env_out():
    values = env()
    assert values["KUBEMAAS_DEVICE"] == "cpu"
    assert "KUBEMAAS_MAX_DRIFT" not in values and "KUBEMAAS_ARCHITECTURE" not in values


def test_port_8080_named_http():
    assert container()["ports"] == [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        # no memory in the spec: the operator's documented default is the limit
        ({}, {"requests": {"memory": "4Gi"}, "limits": {"memory": "4Gi"}}),
        ({"resources": {"cpu": 2, "memory": "8Gi"}}, {"requests": {"cpu": "2", "memory": "8Gi"}, "limits": {"memory": "8Gi"}}),
        ({"resources": {"gpu": {"count": 2}}},
         {"requests": {"memory": "4Gi"}, "limits": {"memory": "4Gi", "nvidia.com/gpu": "2"}}),
    ],
    ids=["none", "cpu-memory", "gpu"],
)
def test_resources(spec, expected):
    assert container(spec)["resources"] == expected


@pytest.mark.parametrize(
    ("spec", "node_selector", "tolerations"),
    [
        ({}, None, None),
        (GPU, {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
         [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]),
        ({"resources": {"gpu": {"count": 1}}}, None, [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]),
        ({**GPU, "scheduling": {"nodeSelector": {"zone": "a", "nvidia.com/gpu.product": "other"},
                                "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
                                                {"key": "spot", "operator": "Exists"}]}},
         {"zone": "a", "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
         [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}, {"key": "spot", "operator": "Exists"}]),
    ],
    ids=["cpu", "gpu-product", "gpu-any", "merged-with-user"],
)
def test_scheduling_for_gpus_merged_with_the_users(spec, node_selector, tolerations):
    p = pod(spec)
    assert p.get("nodeSelector") == node_selector
    assert p.get("tolerations") == tolerations


def test_user_affinity_priority_and_runtime_class_pass_through():
    p = pod({"scheduling": {"affinity": {"podAntiAffinity": {}}, "priorityClassName": "high",
                            "runtimeClassName": "nvidia"}})
    assert p["affinity"] == {"podAntiAffinity": {}}
    assert (p["priorityClassName"], p["runtimeClassName"]) == ("high", "nvidia")


def test_probes_on_the_v2_health_endpoints():
    c = container()
    assert c["startupProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    assert c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"] >= SETTINGS.startup_timeout_seconds
    assert c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"


def test_pre_stop_pause_and_grace_period_cover_the_drain():
    p = pod()
    pause = p["containers"][0]["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pause > 0
    assert p["terminationGracePeriodSeconds"] > pause + SETTINGS.drain_seconds
    assert env()["KUBEMAAS_DRAIN_SECONDS"] == str(SETTINGS.drain_seconds)


def test_restricted_security_profile():
    p = pod({"model": {"uri": "s3://bucket/k", "format": "torchscript"}})
    assert p["automountServiceAccountToken"] is False
    assert p["securityContext"]["runAsNonRoot"] is True
    assert p["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    for c in p["containers"] + p["initContainers"]:
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
        assert sc["capabilities"] == {"drop": ["ALL"]}
        assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"]
    assert {"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}} in p["volumes"]
    assert all(v["emptyDir"].get("sizeLimit") for v in p["volumes"] if "emptyDir" in v)
    assert all(c["resources"]["limits"]["memory"] for c in p["containers"] + p["initContainers"])


@pytest.mark.parametrize(
    ("uri", "volume", "mount"),
    [
        ("pvc://models/minilm/v1", {"name": "model", "persistentVolumeClaim": {"claimName": "models", "readOnly": True}},
         {"name": "model", "mountPath": "/mnt/models", "readOnly": True, "subPath": "minilm/v1"}),
        ("pvc://models", {"name": "model", "persistentVolumeClaim": {"claimName": "models", "readOnly": True}},
         {"name": "model", "mountPath": "/mnt/models", "readOnly": True}),
        ("file:///opt/models/m", None, None),
        ("s3://bucket/m.pt", {"name": "model", "emptyDir": {"sizeLimit": "50Gi"}},
         {"name": "model", "mountPath": "/mnt/models", "readOnly": True}),
        ("hf://org/m@abc123", {"name": "model", "emptyDir": {"sizeLimit": "50Gi"}},
         {"name": "model", "mountPath": "/mnt/models", "readOnly": True}),
    ],
    ids=["pvc-subpath", "pvc-whole-claim", "file", "s3", "hf"],
)
def test_model_volume_by_uri_scheme(uri, volume, mount):
    p = pod({"model": {"uri": uri, "format": "torchscript"}})
    model_volumes = [v for v in p["volumes"] if v["name"] == "model"]
    model_mounts = [m for m in p["containers"][0]["volumeMounts"] if m["name"] == "model"]
    assert model_volumes == ([volume] if volume else [])
    assert model_mounts == ([mount] if mount else [])
    assert ("initContainers" in p) == uri.startswith(("s3", "hf"))


def test_fetch_init_container_alone_gets_the_secret():
    p = pod({"model": {"uri": "s3://bucket/m.pt", "format": "torchscript", "secretRef": {"name": "creds"}}})
    (fetch,) = p["initContainers"]
    assert fetch["args"] == ["fetch", "--uri", "s3://bucket/m.pt", "--dest", "/mnt/models",
                             "--max-bytes", str(50 * 2**30), "--timeout-seconds", "3600"]
    assert fetch["image"] == IMAGE
    assert fetch["envFrom"] == [{"secretRef": {"name": "creds"}}]
    assert {"name": "model", "mountPath": "/mnt/models"} in fetch["volumeMounts"]
    assert "envFrom" not in p["containers"][0]
    assert "creds" not in str(p["containers"][0])


# --- Services, PDB ------------------------------------------------------------------------

def test_services_over_all_variants_and_per_variant():
    objs = children(TWO_VARIANTS)
    whole = find(objs, "Service", "m")
    assert whole["spec"]["selector"] == {"kubemaas.io/modelservice": "m"}
    assert whole["spec"]["ports"][0] | {} == {"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP",
                                               "appProtocol": "http"}
    one = find(objs, "Service", "m-int8")
    assert one["spec"]["selector"] == {"kubemaas.io/modelservice": "m", "kubemaas.io/variant": "int8"}


@pytest.mark.parametrize(
    ("spec", "wanted"),
    [({}, False), ({"replicas": 2}, True), ({"autoscaling": {"minReplicas": 1, "maxReplicas": 1, "target": 1}}, False),
     ({"autoscaling": {"minReplicas": 1, "maxReplicas": 3, "target": 1}}, True)],
)
def test_disruption_budget_when_more_than_one_pod(spec, wanted):
    pdbs = [o for o in children(spec) if o["kind"] == "PodDisruptionBudget"]
    assert bool(pdbs) == wanted
    if pdbs:
        assert pdbs[0]["spec"]["maxUnavailable"] == 1
        assert pdbs[0]["spec"]["selector"] == {"matchLabels": {"kubemaas.io/modelservice": "m"}}


# --- autoscaling --------------------------------------------------------------------------

SCALE_TARGET = {"apiVersion": "kubemaas.io/v1alpha1", "kind": "ModelService", "name": "m"}


@pytest.mark.parametrize(
    ("metric", "expected"),
    [
        ("cpu", {"type": "Resource", "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 7}}}),
        ("concurrency", {"type": "Pods", "pods": {"metric": {"name": "kubemaas_inflight_requests"},
                                                  "target": {"type": "AverageValue", "averageValue": "7"}}}),
        ("rps", {"type": "Pods", "pods": {"metric": {"name": "kubemaas_requests_per_second"},
                                          "target": {"type": "AverageValue", "averageValue": "7"}}}),
    ],
)
def test_hpa_targets_the_scale_subresource(metric, expected):
    spec = {"resources": {"cpu": "1"},
            "autoscaling": {"minReplicas": 2, "maxReplicas": 6, "metric": metric, "target": 7,
                            "scaleDownStabilizationSeconds": 60}}
    hpa = find(children(spec), "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == SCALE_TARGET
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 6)
    assert hpa["spec"]["metrics"] == [expected]
    assert hpa["spec"]["behavior"] == {"scaleDown": {"stabilizationWindowSeconds": 60}}


@pytest.mark.parametrize(
    ("metric", "trigger_type", "query"),
    [
        ("concurrency", "prometheus", 'sum(kubemaas_inflight_requests{namespace="ns",model="m"})'),
        ("rps", "prometheus", 'sum(rate(kubemaas_requests_total{namespace="ns",model="m"}[1m]))'),
        ("cpu", "cpu", None),
    ],
)
def test_keda_scaled_object(metric, trigger_type, query):
    spec = {"resources": {"cpu": "1"},
            "autoscaling": {"engine": "keda", "minReplicas": 1, "maxReplicas": 4,  # zero: test_autoscaling.py
                            "metric": metric, "target": 3}}
    objs = children(spec)
    assert not [o for o in objs if o["kind"] == "HorizontalPodAutoscaler"]
    scaled = find(objs, "ScaledObject")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    assert scaled["spec"]["scaleTargetRef"] == SCALE_TARGET
    assert scaled["spec"]["maxReplicaCount"] == 4
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == trigger_type
    if query:
        assert trigger["metadata"] == {"serverAddress": SETTINGS.prometheus_address, "query": query, "threshold": "3"}
    else:
        assert trigger["metadata"] == {"value": "3"}


# --- Gateway ------------------------------------------------------------------------------

def test_http_route_splits_by_weight():
    route = find(children({**TWO_VARIANTS, "gateway": {"name": "public", "namespace": "gateways"}}), "HTTPRoute")
    assert route["apiVersion"] == "gateway.networking.k8s.io/v1"
    assert route["spec"]["parentRefs"] == [{"group": "gateway.networking.k8s.io", "kind": "Gateway",
                                            "name": "public", "namespace": "gateways"}]
    (rule,) = route["spec"]["rules"]
    assert rule["matches"][0] == {"path": {"type": "PathPrefix", "value": "/v2/models/m"}}
    assert [(b["name"], b["port"], b["weight"]) for b in rule["backendRefs"]] == [("m-bf16", 80, 80), ("m-int8", 80, 20)]


# --- node-local model cache (spec.model.cache node) ----------------------------------------

CACHED = {"model": {"uri": "hf://org/m@abc123", "format": "torchscript", "cache": "node"}}


def test_node_cache_mounts_the_entry_read_only_and_fetches_into_it_with_cache():
    from kubemaas_operator.builders.model_cache import cache_key

    key = cache_key("hf://org/m@abc123")
    deployment = find(children(CACHED), "Deployment", "m-default")
    p = deployment["spec"]["template"]["spec"]
    assert [v for v in p["volumes"] if v["name"] in ("model", "model-cache")] == [
        {"name": "model-cache", "persistentVolumeClaim": {"claimName": "m-model-cache"}}]
    assert not any("hostPath" in v for v in p["volumes"])  # restricted Pod Security forbids it
    runtime_mounts = [m for m in p["containers"][0]["volumeMounts"] if m["name"] == "model-cache"]
    assert runtime_mounts == [{"name": "model-cache", "mountPath": "/mnt/models", "subPath": key, "readOnly": True}]
    (fetch,) = p["initContainers"]
    assert fetch["args"] == ["fetch", "--uri", "hf://org/m@abc123", "--dest", f"/cache/{key}", "--cache",
                             "--max-bytes", str(50 * 2**30), "--timeout-seconds", "3600"]
    assert {"name": "model-cache", "mountPath": "/cache"} in fetch["volumeMounts"]
    assert not any(m["name"] == "model" for m in fetch["volumeMounts"])
    assert deployment["spec"]["template"]["metadata"]["labels"]["kubemaas.io/model-cache-key"] == key
    assert p["securityContext"]["fsGroupChangePolicy"] == "OnRootMismatch"
    (preferred,) = p["affinity"]["podAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert preferred["podAffinityTerm"]["labelSelector"] == {"matchLabels": {"kubemaas.io/model-cache-key": key}}
    assert preferred["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"


def test_node_cache_keeps_the_users_affinity_and_default_pods_are_unchanged():
    user = {"podAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
        {"weight": 1, "podAffinityTerm": {"labelSelector": {"matchLabels": {"a": "b"}}, "topologyKey": "zone"}}]}}
    p = pod({**CACHED, "scheduling": {"affinity": user}})
    terms = p["affinity"]["podAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert terms[0] == user["podAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0] and len(terms) == 2
    plain = pod({"model": {"uri": "hf://org/m@abc123", "format": "torchscript"}})
    assert "affinity" not in plain and "fsGroupChangePolicy" not in plain["securityContext"]
    assert "--cache" not in plain["initContainers"][0]["args"]


@pytest.mark.parametrize(("uri", "other"), [("hf://org/m@abc123", "hf://org/m@def456"),
                                            ("s3://bucket/a", "s3://bucket/b")])
def test_cache_key_is_a_dns_label_that_changes_with_the_revision(uri, other):
    import re

    from kubemaas_operator.builders.model_cache import cache_key

    assert cache_key(uri) == cache_key(uri) != cache_key(other)
    assert re.fullmatch(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?", cache_key(uri))


def test_node_cache_children_are_a_local_volume_over_the_node_group_and_its_owned_claim():
    from kubemaas_operator.builders.model_cache import cache_key

    objs = children(CACHED)
    kinds = [o["kind"] for o in objs]
    assert kinds.index("PersistentVolumeClaim") < kinds.index("Deployment")  # the claim before the pods
    volume = find(objs, "PersistentVolume")
    claim = find(objs, "PersistentVolumeClaim", "m-model-cache")
    assert "namespace" not in volume["metadata"] and "ownerReferences" not in volume["metadata"]
    spec = volume["spec"]
    assert spec["local"] == {"path": SETTINGS.model_cache_path} and "hostPath" not in spec
    assert spec["persistentVolumeReclaimPolicy"] == "Retain"
    assert spec["nodeAffinity"]["required"]["nodeSelectorTerms"] == [{"matchExpressions": [
        {"key": SETTINGS.model_cache_node_label, "operator": "In", "values": ["true"]}]}]
    assert spec["claimRef"]["namespace"] == claim["metadata"]["namespace"]
    assert spec["claimRef"]["name"] == "m-model-cache"
    assert claim["spec"]["volumeName"] == volume["metadata"]["name"]
    assert claim["spec"]["storageClassName"] == spec["storageClassName"]
    assert claim["metadata"]["ownerReferences"][0]["kind"] == "ModelService"
    assert claim["metadata"]["labels"]["kubemaas.io/model-cache-key"] == cache_key("hf://org/m@abc123")
    assert not [o for o in children() if o["kind"].startswith("PersistentVolume")]
