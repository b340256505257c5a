"""spec.routing: inferencePool in the builders and the reconcile's decision (issue 27.3)."""

from __future__ import annotations

import pytest
import yaml
from kubemaas_operator.builders import build_children
from kubemaas_operator.builders.inference_pool import PICKER_LABEL
from kubemaas_operator.builders.naming import MODELSERVICE_LABEL
from kubemaas_operator.reconcile import (
    OBJECTIVE_NOT_INSTALLED,
    ROUTING_DISABLED,
    Reconciler,
    decide,
)
from kubemaas_operator.settings import OperatorSettings
from kubemaas_operator.store import Store

from tests.unit.support import make_ms
from tests.unit.test_contract import runtime_registry_names

PICKER = "registry.example/gie-epp:v1.2.0"
SETTINGS = OperatorSettings(endpoint_picker_image=PICKER)
GGUF = {"uri": "pvc://models/smollm2.gguf", "format": "gguf"}
ROUTED = {"model": GGUF, "gateway": {"name": "public", "namespace": "gateways"}, "routing": "inferencePool",
          "replicas": 2, "variants": [{"name": "a", "quantization": "none", "weight": 50},
                                      {"name": "b", "quantization": "bf16", "weight": 50}]}


def by_kind(spec: dict, settings: OperatorSettings = SETTINGS) -> dict[tuple[str, str], dict]:
    return {(c["kind"], c["metadata"]["name"]): c for c in build_children(make_ms(spec), settings)}


def test_routing_adds_the_pool_the_picker_and_a_route_to_the_pool():
    children = by_kind(ROUTED)
    assert set(children) - set(by_kind({**ROUTED, "routing": None})) == {
        ("InferencePool", "m"), ("ServiceAccount", "m-epp"), ("Role", "m-epp"), ("RoleBinding", "m-epp"),
        ("ConfigMap", "m-epp"), ("Deployment", "m-epp"), ("Service", "m-epp")}
    route = children[("HTTPRoute", "m")]
    (rule,) = route["spec"]["rules"]
    assert rule["backendRefs"] == [{"group": "inference.networking.k8s.io", "kind": "InferencePool", "name": "m"}]
    assert [m["path"]["value"] for m in rule["matches"]] == ["/v2/models/m", "/v1"]
    for child in children.values():
        assert child["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
        assert child["metadata"]["labels"][MODELSERVICE_LABEL] == "m"  # found by the prune


def test_the_pool_selects_the_variant_pods_and_names_the_picker():
    children = by_kind(ROUTED)
    pool = children[("InferencePool", "m")]
    assert pool["apiVersion"] == "inference.networking.k8s.io/v1"
    assert pool["spec"]["targetPorts"] == [{"number": 8080}]
    assert pool["spec"]["endpointPickerRef"] == {"group": "", "kind": "Service", "name": "m-epp",
                                                 "port": {"number": 9002}, "failureMode": "FailClose"}
    selector = pool["spec"]["selector"]["matchLabels"]
    for variant in ("a", "b"):
        labels = children[("Deployment", f"m-{variant}")]["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= labels.items()
    picker_pod = children[("Deployment", "m-epp")]["spec"]["template"]["metadata"]["labels"]
    assert not selector.items() <= picker_pod.items()
    # nor is the picker one of the model's pods for its Services, status and PDB
    assert MODELSERVICE_LABEL not in picker_pod
    assert children[("Service", "m-epp")]["spec"]["selector"] == {PICKER_LABEL: "m"}


def test_the_picker_runs_restricted_with_a_read_only_role():
    children = by_kind(ROUTED)
    pod = children[("Deployment", "m-epp")]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == PICKER
    assert {"--pool-name=m", "--pool-namespace=ns", "--grpc-port=9002"} <= set(container["args"])
    assert container["volumeMounts"] == [{"name": "config", "mountPath": "/config", "readOnly": True}]
    assert pod["serviceAccountName"] == "m-epp"
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                            "runAsNonRoot": True, "capabilities": {"drop": ["ALL"]}}
    rules = children[("Role", "m-epp")]["rules"]
    assert {(g, r) for rule in rules for g in rule["apiGroups"] for r in rule["resources"]} == {
        ("inference.networking.k8s.io", "inferencepools"), ("inference.networking.x-k8s.io", "inferenceobjectives"),
        ("", "pods")}
    assert all(rule["verbs"] == ["get", "list", "watch"] for rule in rules)
    binding = children[("RoleBinding", "m-epp")]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "m-epp", "namespace": "ns"}]


def picker_flags(spec: dict = ROUTED) -> dict[str, str]:
    (container,) = by_kind(spec)[("Deployment", "m-epp")]["spec"]["template"]["spec"]["containers"]
    flags = dict(arg.removeprefix("--").split("=", 1) for arg in container["args"])
    assert len(flags) == len(container["args"]), container["args"]  # each flag once, as --name=value
    return flags


def test_the_picker_watches_the_v1_pool_and_reads_its_config_file():
    flags = picker_flags()
    assert (flags["pool-name"], flags["pool-namespace"], flags["pool-group"]) == (
        "m", "ns", "inference.networking.k8s.io")
    assert (flags["grpc-port"], flags["grpc-health-port"], flags["metrics-port"]) == ("9002", "9003", "9090")
    assert flags["config-file"] == "/config/picker.yaml"  # the ConfigMap's key, where it is mounted
    assert flags["secure-serving"] == "false"
    assert "endpoint-selector" not in flags  # the pool, not a selector, names the pods


def test_the_picker_scrapes_the_runtimes_own_metric_names():
    flags = picker_flags()
    assert flags["total-queued-requests-metric"] == "kubemaas_num_requests_waiting"
    assert flags["kv-cache-usage-percentage-metric"] == "kubemaas_kv_cache_usage_ratio"
    assert flags["lora-info-metric"] == "kubemaas_lora_requests_info"
    for flag in ("total-queued-requests-metric", "kv-cache-usage-percentage-metric", "lora-info-metric"):
        assert flags[flag] in runtime_registry_names(), flags[flag]


def test_the_picker_config_weighs_queue_kv_cache_and_lora_affinity():
    config = yaml.safe_load(by_kind(ROUTED)[("ConfigMap", "m-epp")]["data"]["picker.yaml"])
    assert (config["apiVersion"], config["kind"]) == (
        "inference.networking.x-k8s.io/v1alpha1", "EndpointPickerConfig")
    types = [p["type"] for p in config["plugins"]]
    assert types == ["queue-scorer", "kv-cache-utilization-scorer", "lora-affinity-scorer",
                     "max-score-picker", "single-profile-handler"]
    (profile,) = config["schedulingProfiles"]
    weights = {ref["pluginRef"]: ref.get("weight") for ref in profile["plugins"]}
    assert weights == {"queue-scorer": 2, "kv-cache-utilization-scorer": 2, "lora-affinity-scorer": 1,
                       "max-score-picker": None}
    assert set(weights) <= set(types)  # every reference names a declared plugin


def test_routing_off_renders_the_weighted_route():
    children = by_kind({**ROUTED, "routing": None})
    assert not any(kind == "InferencePool" for kind, _ in children)
    (rule,) = children[("HTTPRoute", "m")]["spec"]["rules"]
    assert [b["name"] for b in rule["backendRefs"]] == ["m-a", "m-b"]


@pytest.mark.parametrize(("image", "refusal"), [("", ROUTING_DISABLED), (PICKER, None)])
def test_routing_needs_the_operators_switch(image, refusal):
    plan = decide(make_ms(ROUTED), OperatorSettings(endpoint_picker_image=image), None)
    assert plan.blocked == refusal


class _Kube:
    """Serves every kind but, unless told, the picker's InferenceObjective; records applies."""

    def __init__(self, objectives: bool) -> None:
        self.objectives = objectives
        self.applied: list[tuple[str, str]] = []

    def served(self, kind, namespace):
        return kind != "InferenceObjective" or self.objectives

    def apply(self, obj, force=False):
        self.applied.append((obj["kind"], obj["metadata"]["name"]))
        return {**obj, "metadata": {**obj["metadata"], "generation": 1}}

    def list(self, kind, namespace, selector):
        return []


@pytest.mark.parametrize("objectives", [False, True])
def test_without_the_objective_crd_the_pool_and_picker_are_not_written(objectives):
    kube = _Kube(objectives)
    _, problem = Reconciler(kube, SETTINGS).reconcile(Store(), make_ms(ROUTED), None, prune=False)
    assert ("Deployment", "m-a") in kube.applied  # the model's pods come first either way
    written = {("InferencePool", "m"), ("Deployment", "m-epp")} <= set(kube.applied)
    if objectives:
        assert problem is None and written
    else:
        assert problem == OBJECTIVE_NOT_INSTALLED and not written
        assert "inferenceobjectives.inference.networking.x-k8s.io" in problem.message
