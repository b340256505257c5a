"""charts/kubemaas offline: lint, render with defaults and every documented option, validate
each object against the Kubernetes 1.35 schemas, the values schema refusing bad values, RBAC
that grants only what the operator uses, the CRD identical to crds/, one version everywhere."""

from __future__ import annotations

import tomllib
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kubemaas_operator import kube
from kubemaas_operator.settings import DEFAULT_RUNTIME_IMAGE, OperatorSettings

from tests.unit.chart import (
    CHART,
    CRD_FILE,
    REPO,
    by_kind,
    chart_meta,
    container_env,
    helm,
    one,
    render,
    values_args,
)

K8S_VERSION = "1.35.0"
CRD_KINDS = {"ServiceMonitor", "PodMonitor"}  # prometheus-operator kinds: no built-in schema
DIGEST = "sha256:" + "0123456789abcdef" * 4

# One case per documented option (docs/install.md lists them); a test checks every key of
# values.yaml is changed by at least one case.
CASES: dict[str, dict[str, Any]] = {
    "defaults": {},
    "crds-not-installed": {"crds": {"install": False}},
    "crds-not-kept": {"crds": {"keep": False}},
    "image-by-tag": {"image": {"repository": "registry.example.com/ml/kubemaas-operator",
                               "tag": "0.1.0-dev", "pullPolicy": "Always"}},
    "image-by-digest": {"image": {"digest": DIGEST}},
    "pull-secrets": {"imagePullSecrets": [{"name": "registry-credentials"}]},
    "name-overrides": {"nameOverride": "maas", "fullnameOverride": "maas-operator"},
    "existing-service-account": {"serviceAccount": {"create": False, "name": "platform-ops"}},
    "service-account-annotations": {"serviceAccount": {
        "name": "kubemaas", "annotations": {"eks.amazonaws.com/role-arn": "arn:aws:iam::1:role/x"}}},
    "no-rbac": {"rbac": {"create": False, "aggregateToDefaultRoles": False}},
    "watch-namespaces": {"watchNamespaces": ["ml", "ml-staging"]},
    "multi-node": {"multiNode": {"enabled": True}},
    "model-cache": {"modelCache": {"enabled": True, "path": "/data/cache", "nodeLabel": "example.com/cache",
                                   "capacity": "2Ti", "sweepSeconds": 120}},
    # the single image value of earlier charts still sets the builtin flavour's image
    "legacy-runtime-image": {"operator": {"runtimeImage": "registry.example.com/kubemaas-runtime:old"}},
    "operator-settings": {"operator": {
        "runtimeImages": {"builtin": "registry.example.com/kubemaas-runtime:cu126",
                          "vllm": "registry.example.com/kubemaas-runtime-vllm:cu126"},
        "gpuResourceName": "amd.com/gpu",
        "gpuProductLabel": "amd.com/gpu.product-name", "gpuMemoryLabel": "amd.com/gpu.vram",
        "logFormat": "text", "verbose": True,
        "clusterDomain": "corp.internal", "prometheusAddress": "http://prometheus.obs:9090",
        "gatewayRequestQuery": 'sum(rate(istio_requests_total{destination_service_namespace="{namespace}",'
                               'destination_service_name=~"{name}-.+"}[1m]))',
        "startupTimeoutSeconds": 600, "drainSeconds": 10, "workers": 4, "healthPort": 8081,
        "metricsPort": 9100, "extraEnv": [{"name": "TZ", "value": "UTC"}],
        "runtimeMemoryLimit": "6Gi", "tmpSizeLimit": "2Gi", "modelVolumeSizeLimit": "100Gi",
        "fetchTimeoutSeconds": 600,
        "allowedRuntimeImages": ["registry.example.com/kubemaas-runtime:*", "registry.example.com/kubemaas-runtime@*"],
        "trustedCodeSources": ["pvc://", "s3://models/"]},
        "networkPolicy": {"enabled": False, "metricsNamespace": "observability"}},
    "inference-routing": {"inferenceRouting": {"enabled": True, "pickerImage": "registry.example.com/lwepp:v1.6.2"}},
    "inference-routing-namespaced": {"watchNamespaces": ["ml"],
                                     "inferenceRouting": {"enabled": True, "pickerImage": "registry.example.com/lwepp:v1.6.2"}},
    "scheduling": {
        "resources": {"requests": {"cpu": "50m", "memory": "128Mi"}, "limits": {"cpu": 1, "memory": "1Gi"}},
        "podAnnotations": {"example.com/team": "ml-platform"}, "podLabels": {"team": "ml"},
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "system", "effect": "NoSchedule"}],
        "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchExpressions": [
                {"key": "kubernetes.io/arch", "operator": "In", "values": ["amd64", "arm64"]}]}]}}},
        "priorityClassName": "system-cluster-critical"},
    "monitoring": {"metrics": {
        "service": {"port": 9100, "annotations": {"prometheus.io/scrape": "true"}},
        "serviceMonitor": {"enabled": True, "interval": "1m", "labels": {"release": "prom"}},
        "podMonitor": {"enabled": True, "interval": "10s", "labels": {"release": "prom"}}}},
    "monitoring-namespaced": {"watchNamespaces": ["ml"],
                              "metrics": {"podMonitor": {"enabled": True}}},
    "no-metrics-service": {"metrics": {"service": {"enabled": False}}},
}

# Values the schema refuses, with what the error must name.
BAD_VALUES = {
    "unknown-top-level-key": ({"replicaCount": 2}, "replicaCount"),
    "misspelt-nested-key": ({"operator": {"logFormt": "json"}}, "logFormt"),
    "enum": ({"operator": {"logFormat": "yaml"}}, "/operator/logFormat"),
    "integer-as-string": ({"operator": {"workers": "eight"}}, "/operator/workers"),
    "below-minimum": ({"operator": {"startupTimeoutSeconds": 5}}, "/operator/startupTimeoutSeconds"),
    "port-range": ({"operator": {"healthPort": 70000}}, "/operator/healthPort"),
    "list-as-string": ({"watchNamespaces": "ml"}, "/watchNamespaces"),
    "namespace-not-a-dns-label": ({"watchNamespaces": ["ML_Team"]}, "/watchNamespaces/0"),
    "boolean-as-string": ({"crds": {"install": "yes"}}, "/crds/install"),
    "digest-shape": ({"image": {"digest": "latest"}}, "/image/digest"),
    "pull-policy": ({"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy"),
    "quantity": ({"resources": {"limits": {"memory": "lots"}}}, "/resources/limits/memory"),
    "interval": ({"metrics": {"podMonitor": {"interval": 30}}}, "/metrics/podMonitor/interval"),
    "pull-secret-shape": ({"imagePullSecrets": ["regcred"]}, "/imagePullSecrets/0"),
    "unknown-resources-key": ({"resources": {"limit": {"cpu": 1}}}, "limit"),
}


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, list[dict[str, Any]]]:
    tmp = tmp_path_factory.mktemp("values")
    return {name: render(tmp, values) for name, values in CASES.items()}


def leaves(tree: dict[str, Any], prefix: str = "") -> set[str]:
    """Dotted paths of values; an empty map or a list is one leaf."""
    out: set[str] = set()
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value and not path.endswith(("annotations", "labels",
                                                                    "Labels", "Annotations")):
            out |= leaves(value, path + ".")
        else:
            out.add(path)
    return out


def values_leaves() -> set[str]:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    # resources' requests/limits are one option each, like any map
    return {p for p in leaves(values) if not p.startswith("resources.")} | {"resources"}


def case_leaves(values: dict[str, Any]) -> set[str]:
    found = set()
    for path in leaves(values):
        found.add(path)
        parts = path.split(".")
        found |= {".".join(parts[:i]) for i in range(1, len(parts))}
    return found


# --- lint and schemas -----------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES)
def test_helm_lint_strict(case, tmp_path):
    result = helm("lint", "--strict", str(CHART), *values_args(CASES[case], tmp_path))
    assert "0 chart(s) failed" in result.stdout


def test_every_documented_option_has_a_case():
    covered = set().union(*(case_leaves(v) for v in CASES.values()))
    missing = sorted(values_leaves() - covered)
    assert not missing, f"options no test case sets: {missing}"


def test_docs_list_every_option():
    text = (REPO / "docs" / "install.md").read_text()
    missing = sorted(p for p in values_leaves() if f"`{p}`" not in text)
    assert not missing, f"docs/install.md does not document: {missing}"


@pytest.mark.parametrize("case", CASES)
def test_rendered_objects_are_valid_kubernetes_objects(case, rendered):
    objects = rendered[case]
    assert objects
    for obj in objects:
        if obj["kind"] in CRD_KINDS:
            continue
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


@pytest.mark.parametrize("case", BAD_VALUES)
def test_values_schema_refuses(case, tmp_path):
    values, named = BAD_VALUES[case]
    result = helm("template", "kubemaas", str(CHART), *values_args(values, tmp_path), check=False)
    assert result.returncode != 0, f"accepted {values}"
    assert "values don't meet the specifications of the schema" in result.stderr
    assert named in result.stderr, result.stderr


def test_schema_is_closed_everywhere():
    import json

    def walk(node: dict[str, Any], path: str) -> None:
        if node.get("type") == "object" and "properties" in node:
            assert node.get("additionalProperties") is False or path.endswith("extraEnv[]"), path
            for key, child in node["properties"].items():
                walk(child, f"{path}.{key}")
        if isinstance(node.get("items"), dict):
            walk(node["items"], f"{path}[]")

    walk(json.loads((CHART / "values.schema.json").read_text()), "")


def test_service_monitor_needs_the_metrics_service(tmp_path):
    values = {"metrics": {"service": {"enabled": False}, "serviceMonitor": {"enabled": True}}}
    result = helm("template", "kubemaas", str(CHART), *values_args(values, tmp_path), check=False)
    assert result.returncode != 0 and "metrics.service.enabled" in result.stderr


# --- one version, one CRD ---------------------------------------------------------------------

def test_versions_agree():
    meta = chart_meta()
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert meta["version"] == meta["appVersion"] == pyproject
    assert DEFAULT_RUNTIME_IMAGE.rsplit(":", 1)[1] == meta["appVersion"]


def test_chart_crd_files_are_the_generated_crds():
    ours = sorted(p.name for p in (CHART / "files" / "crds").glob("*.yaml"))
    theirs = sorted(p.name for p in (REPO / "crds").glob("*.yaml"))
    assert ours == theirs
    for name in theirs:
        assert (CHART / "files" / "crds" / name).read_bytes() == (REPO / "crds" / name).read_bytes(), (
            f"charts/kubemaas/files/crds/{name} differs from crds/{name}: run hack/sync-chart-crds")


def test_rendered_crd_is_crds_plus_the_keep_policy(rendered):
    crd = one(rendered["defaults"], "CustomResourceDefinition")
    expected = yaml.safe_load((REPO / "crds" / CRD_FILE).read_text())
    assert crd["metadata"].pop("annotations") == {"helm.sh/resource-policy": "keep"}
    assert crd == expected


def test_crd_options(rendered):
    assert not by_kind(rendered["crds-not-installed"], "CustomResourceDefinition")
    crd = one(rendered["crds-not-kept"], "CustomResourceDefinition")
    assert "annotations" not in crd["metadata"]


# --- the operator Deployment --------------------------------------------------------------------

def pod_spec(objects: list[dict[str, Any]]) -> dict[str, Any]:
    return one(objects, "Deployment")["spec"]["template"]["spec"]


def test_one_replica_recreated_not_rolled(rendered):
    dep = one(rendered["defaults"], "Deployment")
    assert dep["spec"]["replicas"] == 1
    assert dep["spec"]["strategy"] == {"type": "Recreate"}


def test_restricted_security_context(rendered):
    spec = pod_spec(rendered["defaults"])
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] != 0
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (container,) = spec["containers"]
    sc = container["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]


def test_liveness_probe_on_the_health_endpoint(rendered):
    for case in ("defaults", "operator-settings"):
        (container,) = pod_spec(rendered[case])["containers"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        env = container_env(one(rendered[case], "Deployment"))
        assert ports["health"] == int(env["KUBEMAAS_OPERATOR_HEALTH_PORT"])
        assert ports["metrics"] == int(env["KUBEMAAS_OPERATOR_METRICS_PORT"])
        for probe in ("livenessProbe", "startupProbe"):
            assert container[probe]["httpGet"] == {"path": "/healthz", "port": "health"}


def test_image_by_tag_or_digest(rendered):
    image = lambda case: pod_spec(rendered[case])["containers"][0]["image"]
    assert image("defaults") == f"ghcr.io/kubemaas/kubemaas-operator:{chart_meta()['appVersion']}"
    assert image("image-by-tag") == "registry.example.com/ml/kubemaas-operator:0.1.0-dev"
    assert image("image-by-digest") == f"ghcr.io/kubemaas/kubemaas-operator@{DIGEST}"
    assert pod_spec(rendered["image-by-tag"])["containers"][0]["imagePullPolicy"] == "Always"
    assert pod_spec(rendered["pull-secrets"])["imagePullSecrets"] == [{"name": "registry-credentials"}]


def test_default_settings_are_the_operators_defaults(rendered):
    """...except the log format: in a cluster, logs go to a collector that parses JSON."""
    env = container_env(one(rendered["defaults"], "Deployment"))
    assert OperatorSettings.from_env(env) == OperatorSettings(log_format="json")


def test_the_runtime_images_of_both_flavours(rendered):
    """Defaults: the project's two images at the chart's appVersion; the deprecated single value
    still sets the builtin one (an upgrade keeps a values file working)."""
    app = yaml.safe_load((REPO / "charts/kubemaas/Chart.yaml").read_text())["appVersion"]
    defaults = OperatorSettings.from_env(container_env(one(rendered["defaults"], "Deployment")))
    assert (defaults.runtime_image, defaults.runtime_image_vllm) == (
        f"ghcr.io/kubemaas/kubemaas-runtime:{app}", f"ghcr.io/kubemaas/kubemaas-runtime-vllm:{app}")
    legacy = OperatorSettings.from_env(container_env(one(rendered["legacy-runtime-image"], "Deployment")))
    assert legacy.runtime_image == "registry.example.com/kubemaas-runtime:old"
    assert legacy.runtime_image_vllm == defaults.runtime_image_vllm


def test_every_setting_is_a_value(rendered):
    """Every operator setting but the field manager (changing it would orphan fields the
    operator owns) is set from the chart, and the values reach the operator as typed."""
    env = container_env(one(rendered["operator-settings"], "Deployment"))
    exposed = {name.removeprefix("KUBEMAAS_OPERATOR_").lower() for name in env
               if name.startswith("KUBEMAAS_OPERATOR_")}
    assert exposed == set(OperatorSettings.model_fields) - {"field_manager"}
    settings = OperatorSettings.from_env(env)
    op = CASES["operator-settings"]["operator"]
    assert settings.runtime_image == op["runtimeImages"]["builtin"]
    assert settings.runtime_image_vllm == op["runtimeImages"]["vllm"]
    assert (settings.gpu_resource_name, settings.gpu_product_label) == (op["gpuResourceName"],
                                                                        op["gpuProductLabel"])
    assert settings.gpu_memory_label == op["gpuMemoryLabel"]
    assert (settings.log_format, settings.verbose, settings.cluster_domain) == ("text", True,
                                                                                "corp.internal")
    assert (settings.workers, settings.health_port, settings.metrics_port) == (4, 8081, 9100)
    assert (settings.startup_timeout_seconds, settings.drain_seconds) == (600, 10)
    assert settings.prometheus_address == op["prometheusAddress"]
    assert settings.gateway_request_query == op["gatewayRequestQuery"]
    assert env["TZ"] == "UTC"
    assert (settings.runtime_memory_limit, settings.tmp_size_limit, settings.model_volume_size_limit,
            settings.fetch_timeout_seconds) == ("6Gi", "2Gi", "100Gi", 600)
    assert settings.allowed_runtime_images == tuple(op["allowedRuntimeImages"])
    assert settings.trusted_code_sources == ("pvc://", "s3://models/")
    assert (settings.network_policy, settings.metrics_namespace) == (False, "observability")
    ns_env = container_env(one(rendered["watch-namespaces"], "Deployment"))
    assert OperatorSettings.from_env(ns_env).namespaces == ("ml", "ml-staging")


def test_scheduling_options(rendered):
    spec = pod_spec(rendered["scheduling"])
    values = CASES["scheduling"]
    for key in ("nodeSelector", "tolerations", "affinity", "priorityClassName"):
        assert spec[key] == values[key], key
    assert spec["containers"][0]["resources"] == values["resources"]
    template = one(rendered["scheduling"], "Deployment")["spec"]["template"]
    assert template["metadata"]["annotations"] == values["podAnnotations"]
    assert template["metadata"]["labels"]["team"] == "ml"


def test_names_and_service_account(rendered):
    dep = one(rendered["name-overrides"], "Deployment")
    assert dep["metadata"]["name"] == "maas-operator"
    assert pod_spec(rendered["existing-service-account"])["serviceAccountName"] == "platform-ops"
    assert not by_kind(rendered["existing-service-account"], "ServiceAccount")
    sa = one(rendered["service-account-annotations"], "ServiceAccount")
    assert sa["metadata"]["annotations"] == CASES["service-account-annotations"]["serviceAccount"]["annotations"]
    for binding in by_kind(rendered["existing-service-account"], "ClusterRoleBinding"):
        assert binding["subjects"][0]["name"] == "platform-ops"


# --- RBAC -----------------------------------------------------------------------------------------

def rules_of(role: dict[str, Any]) -> dict[tuple[str, str], set[str]]:
    out: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                out.setdefault((group, resource), set()).update(rule["verbs"])
    return out


READ = {"get", "list", "watch"}
OWN = READ | {"create", "patch", "delete"}
OPERATOR_RULES = {
    ("kubemaas.io", "modelservices"): READ | {"patch"},
    ("kubemaas.io", "modelservices/status"): {"patch"},
    ("apps", "deployments"): OWN,
    ("", "services"): OWN,
    ("policy", "poddisruptionbudgets"): OWN,
    ("autoscaling", "horizontalpodautoscalers"): OWN,
    ("keda.sh", "scaledobjects"): OWN,
    ("gateway.networking.k8s.io", "httproutes"): OWN,
    ("networking.k8s.io", "networkpolicies"): OWN,
    ("", "configmaps"): OWN - {"watch"},  # spec.adapters' ConfigMap (and the picker's config)
    ("", "pods"): READ,
    ("apps", "replicasets"): READ,
    ("", "events"): {"create"},
}
# With inferenceRouting.enabled: the pool and the endpoint picker's children (kube.ROUTING_KINDS);
# watch on inferencepools and read on inferenceobjectives only because the picker's Role grants
# them (no escalation).
ROUTING_RULES = {
    ("inference.networking.k8s.io", "inferencepools"): OWN,
    ("inference.networking.x-k8s.io", "inferenceobjectives"): READ,
    ("", "serviceaccounts"): OWN - {"watch"},
    ("rbac.authorization.k8s.io", "roles"): OWN - {"watch"},
    ("rbac.authorization.k8s.io", "rolebindings"): OWN - {"watch"},
}
# With multiNode.enabled: one KubeRay RayCluster per replica of a variant over several nodes.
MULTI_NODE_RULES = {("ray.io", "rayclusters"): OWN}
# With modelCache.enabled: the local PV (cluster-scoped, so with the discovery rules) and its claim.
MODEL_CACHE_RULES = {("", "persistentvolumeclaims"): {"get", "list", "create", "patch"}}
MODEL_CACHE_CLUSTER_RULES = {("", "persistentvolumes"): {"get", "list", "create", "patch", "delete"}}
# ... and, in the release namespace only, the eviction Jobs and their claim (builders/cache_eviction.py).
MODEL_CACHE_EVICT_RULES = {("batch", "jobs"): {"get", "list", "create", "patch", "delete"},
                           ("", "persistentvolumeclaims"): {"get", "create", "patch"}}
# Cluster-scoped reads, a ClusterRole in every mode: CRDs (is KEDA/Gateway API installed?) and
# nodes (their GPU feature discovery labels: the GPU-fit check).
DISCOVERY_RULES = {("apiextensions.k8s.io", "customresourcedefinitions"): READ, ("", "nodes"): READ}


def operator_roles(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] in ("ClusterRole", "Role")
            and o["metadata"]["name"].endswith("-operator")]


@pytest.mark.parametrize("case", CASES)
def test_no_wildcards_and_no_secrets(case, rendered):
    for obj in rendered[case]:
        for rule in obj.get("rules", []) if obj["kind"] in ("ClusterRole", "Role") else []:
            for field in ("apiGroups", "resources", "verbs"):
                assert "*" not in rule.get(field, []), (obj["metadata"]["name"], rule)
            assert "secrets" not in rule["resources"], (obj["metadata"]["name"], rule)
            assert not {"escalate", "bind", "impersonate"} & set(rule["verbs"])


def test_cluster_wide_operator_role_is_exactly_what_it_uses(rendered):
    (role,) = operator_roles(rendered["defaults"])
    assert role["kind"] == "ClusterRole"
    assert rules_of(role) == OPERATOR_RULES | DISCOVERY_RULES
    binding = one(rendered["defaults"], "ClusterRoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "kubemaas",
                                    "namespace": "kubemaas-system"}]


def test_rules_cover_every_kind_the_operator_client_touches():
    """kube.KINDS is what the operator's client reads and writes: a new kind there needs RBAC
    (the routing kinds only with inferenceRouting.enabled)."""
    for k in kube.KINDS.values():
        group = k.api_version.rpartition("/")[0]
        verbs = (OPERATOR_RULES | ROUTING_RULES | MULTI_NODE_RULES | MODEL_CACHE_EVICT_RULES | MODEL_CACHE_RULES
                 | MODEL_CACHE_CLUSTER_RULES | DISCOVERY_RULES).get((group, k.plural))
        if k.kind == "Job":  # the cache's eviction Jobs: applied, listed by the sweep, a failed one deleted
            assert verbs == {"get", "list", "create", "patch", "delete"}, verbs
            continue
        assert verbs and READ - {"watch"} <= verbs, f"{k.kind}: no read access in the chart"
        if k.kind in kube.OWNED_KINDS + kube.ROUTING_KINDS:
            assert {"create", "patch", "delete"} <= verbs, f"{k.kind}: cannot be applied"


@pytest.mark.parametrize(("case", "role_kind"), [("inference-routing", "ClusterRole"),
                                                 ("inference-routing-namespaced", "Role")])
def test_inference_routing_switch_grants_the_routing_kinds_and_sets_the_picker(rendered, case, role_kind):
    (role,) = [r for r in operator_roles(rendered[case]) if r["kind"] == role_kind]
    assert rules_of(role) == OPERATOR_RULES | ROUTING_RULES | (DISCOVERY_RULES if role_kind == "ClusterRole" else {})
    env = container_env(one(rendered[case], "Deployment"))
    assert OperatorSettings.from_env(env).endpoint_picker_image == "registry.example.com/lwepp:v1.6.2"
    off = container_env(one(rendered["defaults"], "Deployment"))
    assert OperatorSettings.from_env(off).endpoint_picker_image == ""


def test_inference_routing_needs_a_picker_image(tmp_path):
    values = {"inferenceRouting": {"enabled": True}}
    result = helm("template", "kubemaas", str(CHART), *values_args(values, tmp_path), check=False)
    assert result.returncode != 0 and "inferenceRouting.pickerImage is required" in result.stderr, result.stderr


def test_namespaced_mode_uses_roles(rendered):
    objects = rendered["watch-namespaces"]
    roles = operator_roles(objects)
    (cluster_role,) = [r for r in roles if r["kind"] == "ClusterRole"]
    assert rules_of(cluster_role) == DISCOVERY_RULES | {("", "namespaces"): READ}
    namespaced = {r["metadata"]["namespace"]: r for r in roles if r["kind"] == "Role"}
    assert set(namespaced) == {"ml", "ml-staging"}
    for role in namespaced.values():
        assert rules_of(role) == OPERATOR_RULES
    bindings = by_kind(objects, "RoleBinding")
    assert {b["metadata"]["namespace"] for b in bindings} == {"ml", "ml-staging"}
    for b in bindings:
        assert b["subjects"][0] == {"kind": "ServiceAccount", "name": "kubemaas",
                                    "namespace": "kubemaas-system"}


def test_aggregated_view_and_edit_roles(rendered):
    roles = {r["metadata"]["name"]: r for r in by_kind(rendered["defaults"], "ClusterRole")}
    view, edit = roles["kubemaas-view"], roles["kubemaas-edit"]
    assert view["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-view"] == "true"
    assert edit["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-edit"] == "true"
    assert rules_of(view)[("kubemaas.io", "modelservices")] == READ
    assert {"create", "update", "patch", "delete"} <= rules_of(edit)[("kubemaas.io", "modelservices")]


def test_rbac_can_be_left_out(rendered):
    kinds = {o["kind"] for o in rendered["no-rbac"]}
    assert not kinds & {"ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"}


# --- metrics -------------------------------------------------------------------------------------

def test_metrics_service_and_monitors(rendered):
    default_kinds = {o["kind"] for o in rendered["defaults"]}
    assert "Service" in default_kinds and not default_kinds & CRD_KINDS
    objects = rendered["monitoring"]
    service = one(objects, "Service")
    assert service["spec"]["ports"] == [{"name": "metrics", "port": 9100, "targetPort": "metrics",
                                         "protocol": "TCP"}]
    dep = one(objects, "Deployment")
    assert service["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    monitor = one(objects, "ServiceMonitor")
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    assert monitor["metadata"]["labels"]["release"] == "prom"
    pods = one(objects, "PodMonitor")
    assert pods["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"] == "kubemaas-runtime"
    assert pods["spec"]["podMetricsEndpoints"][0]["port"] == "http"  # the runtime's port name
    assert pods["spec"]["namespaceSelector"] == {"any": True}
    scoped = one(rendered["monitoring-namespaced"], "PodMonitor")
    assert scoped["spec"]["namespaceSelector"] == {"matchNames": ["ml"]}
    assert not by_kind(rendered["no-metrics-service"], "Service")



def test_multi_node_grants_rayclusters_only_when_on(rendered):
    (off,) = operator_roles(rendered["defaults"])
    (on,) = operator_roles(rendered["multi-node"])
    assert ("ray.io", "rayclusters") not in rules_of(off)
    assert rules_of(on) == OPERATOR_RULES | DISCOVERY_RULES | MULTI_NODE_RULES
    assert not OperatorSettings.from_env(container_env(one(rendered["defaults"], "Deployment"))).multi_node
    assert OperatorSettings.from_env(container_env(one(rendered["multi-node"], "Deployment"))).multi_node


def test_model_cache_grants_volumes_and_claims_only_when_on(rendered):
    (off,) = operator_roles(rendered["defaults"])
    (on,) = operator_roles(rendered["model-cache"])
    assert not {("", "persistentvolumes"), ("", "persistentvolumeclaims")} & set(rules_of(off))
    assert rules_of(on) == OPERATOR_RULES | DISCOVERY_RULES | MODEL_CACHE_RULES | MODEL_CACHE_CLUSTER_RULES
    assert not OperatorSettings.from_env(container_env(one(rendered["defaults"], "Deployment"))).model_cache
    settings = OperatorSettings.from_env(container_env(one(rendered["model-cache"], "Deployment")))
    assert settings.model_cache and settings.model_cache_path == "/data/cache"
    assert settings.model_cache_node_label == "example.com/cache" and settings.model_cache_capacity == "2Ti"
    assert settings.model_cache_eviction_namespace == "kubemaas-system"
    assert settings.model_cache_sweep_seconds == 120
    assert OperatorSettings.from_env(container_env(one(rendered["defaults"], "Deployment"))
                                     ).model_cache_eviction_namespace == ""


def test_model_cache_eviction_gets_jobs_only_in_the_release_namespace_and_only_when_on(rendered):
    evict = [o for o in rendered["model-cache"] if o["kind"] in ("Role", "RoleBinding")
             and o["metadata"]["name"].endswith("-model-cache-evict")]
    assert not [o for o in rendered["defaults"] if o["metadata"]["name"].endswith("-model-cache-evict")]
    role = next(o for o in evict if o["kind"] == "Role")
    binding = next(o for o in evict if o["kind"] == "RoleBinding")
    assert role["metadata"]["namespace"] == binding["metadata"]["namespace"] == "kubemaas-system"
    assert rules_of(role) == MODEL_CACHE_EVICT_RULES
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "kubemaas", "namespace": "kubemaas-system"}]
    # nothing else anywhere grants jobs
    assert not [r for o in rendered["model-cache"] if o["kind"] in ("ClusterRole", "Role") and o is not role
                for r in o.get("rules", []) if "jobs" in r["resources"]]
