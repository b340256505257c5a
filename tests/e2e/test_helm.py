"""The Helm chart on the real control plane: install the previous chart version (an older CRD),
upgrade to this one (the new schema is applied), run the operator as a process with nothing
but the chart's ServiceAccount token and see it reconcile an example to Ready (cluster-wide and
with watchNamespaces), prove with `kubectl auth can-i` that the account can do no more, and
uninstall leaving only the CRD and users' ModelServices.

This module never uses the `operator` fixture (admin credentials): it starts its own
OperatorProcess, one at a time, and stops it before the test ends.
"""

from __future__ import annotations

import json
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubemaas_operator.builders.model_cache import cache_key

from tests.e2e.cluster import Cluster
from tests.e2e.operator_process import OperatorProcess
from tests.unit.chart import CHART, CRD_FILE, container_env, helm, one

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "cpu-minimal.yaml"
EXAMPLE_NAME = "minilm"
CRD = MSVC = "modelservices.kubemaas.io"
PREVIOUS_VERSION = "0.0.1"
# The schema change between the previous chart and this one: a field the old CRD lacks.
NEW_FIELD = ("gateway", "sectionName")
# Our operator writes under its own field manager, so the test can tell its writes apart from
# any other operator that might be running against a shared cluster.
FIELD_MANAGER = "kubemaas-helm-e2e"
PERMISSION_ERRORS = ("forbidden", "Forbidden", "Not enough permissions", " 403")


@dataclass
class Release:
    name: str
    namespace: str
    cluster: Cluster
    tmp: Path
    notes: str = ""
    before_upgrade: Any = None
    after_upgrade: Any = None
    history: list[dict] = field(default_factory=list)

    @property
    def fullname(self) -> str:
        return f"{self.name}-kubemaas"

    @property
    def service_account(self) -> str:
        return self.fullname

    @property
    def user(self) -> str:
        return f"system:serviceaccount:{self.namespace}:{self.service_account}"

    def helm(self, *args: str, check: bool = True):
        return helm(*args, "--namespace", self.namespace, check=check, env=self.cluster.env,
                    timeout=180)

    def rendered_deployment(self, *set_args: str) -> dict:
        out = helm("template", self.name, str(CHART), "--namespace", self.namespace,
                   *set_args).stdout
        return one([d for d in yaml.safe_load_all(out) if d], "Deployment")


def previous_chart(tmp: Path) -> Path:
    """A copy of the chart as the previous version: older version numbers and a CRD without
    the field this version added."""
    old = tmp / "kubemaas-previous"
    shutil.copytree(CHART, old)
    meta = yaml.safe_load((old / "Chart.yaml").read_text())
    meta["version"] = meta["appVersion"] = PREVIOUS_VERSION
    (old / "Chart.yaml").write_text(yaml.safe_dump(meta, sort_keys=False))
    crd_path = old / "files" / "crds" / CRD_FILE
    crd = yaml.safe_load(crd_path.read_text())
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    parent, name = NEW_FIELD
    del spec["properties"][parent]["properties"][name]
    crd_path.write_text(yaml.safe_dump(crd, sort_keys=False))
    return old


def adopt_crd(cluster: Cluster, release: str, namespace: str) -> None:
    """A CRD applied with kubectl (the `crd` fixture, the demo) or kept by an earlier release:
    hand it to this release, as docs/install.md tells users to."""
    if cluster.kubectl("get", "crd", CRD, check=False).returncode != 0:
        return
    cluster.kubectl("label", "--overwrite", "crd", CRD, "app.kubernetes.io/managed-by=Helm")
    cluster.kubectl("annotate", "--overwrite", "crd", CRD,
                    f"meta.helm.sh/release-name={release}",
                    f"meta.helm.sh/release-namespace={namespace}")


def dry_run_new_field(cluster: Cluster, namespace: str) -> Any:
    ms = yaml.safe_load(EXAMPLE.read_text())
    ms["metadata"]["name"] = "schema-probe"
    ms["spec"][NEW_FIELD[0]] = {"name": "public", NEW_FIELD[1]: "http"}
    return cluster.kubectl("apply", "-n", namespace, "--dry-run=server", "-f", "-",
                           input=yaml.safe_dump(ms), check=False)


def poll_dry_run(cluster: Cluster, namespace: str, accepted: bool, timeout: float = 30) -> Any:
    """The dry run's result once it is `accepted` (or refused), else the last one seen."""
    deadline = time.monotonic() + timeout
    while True:
        result = dry_run_new_field(cluster, namespace)
        if (result.returncode == 0) == accepted or time.monotonic() > deadline:
            return result
        time.sleep(0.5)


@pytest.fixture(scope="module")
def release(cluster: Cluster, tmp_path_factory) -> Iterator[Release]:
    suffix = uuid.uuid4().hex[:6]
    rel = Release(name=f"km{suffix}", namespace=f"kubemaas-{suffix}", cluster=cluster,
                  tmp=tmp_path_factory.mktemp("helm"))
    adopt_crd(cluster, rel.name, rel.namespace)
    try:
        # No --wait: the in-cluster operator pod is not what is tested (KWOK only pretends to
        # run it, and a busy shared cluster may not place it); the operator runs as a process.
        out = rel.helm("install", rel.name, str(previous_chart(rel.tmp)), "--create-namespace")
        rel.notes = out.stdout
        cluster.kubectl("wait", "--for=condition=Established", f"crd/{CRD}", "--timeout=60s")
        # A CRD update is served a moment after it is written (Established stays True).
        rel.before_upgrade = poll_dry_run(cluster, rel.namespace, accepted=False)
        rel.helm("upgrade", rel.name, str(CHART))
        cluster.kubectl("wait", "--for=condition=Established", f"crd/{CRD}", "--timeout=60s")
        rel.after_upgrade = poll_dry_run(cluster, rel.namespace, accepted=True)
        rel.history = json.loads(rel.helm("history", rel.name, "-o", "json").stdout)
        yield rel
    finally:
        rel.helm("uninstall", rel.name, "--wait", check=False)
        cluster.kubectl("delete", "namespace", rel.namespace, "--wait=false", check=False)


def service_account_kubeconfig(cluster: Cluster, namespace: str, account: str, path: Path) -> str:
    """A kubeconfig holding only a TokenRequest token of the chart's ServiceAccount."""
    token = cluster.kubectl("create", "token", account, "-n", namespace,
                            "--duration=1h").stdout.strip()
    admin = yaml.safe_load(Path(cluster.kubeconfig).read_text())
    (entry,) = admin["clusters"]
    config = {
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "local", "cluster": entry["cluster"]}],
        "users": [{"name": account, "user": {"token": token}}],
        "contexts": [{"name": "sa", "context": {"cluster": "local", "user": account}}],
        "current-context": "sa",
    }
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o600)
    return str(path)


def chart_operator_env(deployment: dict) -> dict[str, str]:
    """The operator's settings exactly as the chart's Deployment sets them, but the ports
    (OperatorProcess picks free ones) and our own field manager."""
    env = {k: v for k, v in container_env(deployment).items()
           if k not in ("KUBEMAAS_OPERATOR_HEALTH_PORT", "KUBEMAAS_OPERATOR_METRICS_PORT")}
    env["KUBEMAAS_OPERATOR_FIELD_MANAGER"] = FIELD_MANAGER
    env["KUBEMAAS_OPERATOR_LOG_FORMAT"] = "text"
    return env


def reconcile_example_as(rel: Release, deployment: dict, namespace: str) -> str:
    """Start the operator with the chart's ServiceAccount token, apply the example, wait for
    Ready=True written by this operator; return the operator's log."""
    cluster = rel.cluster
    kubeconfig = service_account_kubeconfig(cluster, rel.namespace, rel.service_account,
                                            rel.tmp / f"sa-{uuid.uuid4().hex[:6]}.kubeconfig")
    proc = OperatorProcess(kubeconfig, chart_operator_env(deployment))
    proc.start()
    try:
        cluster.kubectl("apply", "-n", namespace, "-f", str(EXAMPLE))

        def ready():
            ms = cluster.get_json("modelservice", EXAMPLE_NAME, "-n", namespace)
            conditions = {c["type"]: c for c in ms.get("status", {}).get("conditions", [])}
            ok = conditions.get("Ready", {}).get("status") == "True"
            return ms if ok else None

        try:
            cluster.wait_until(ready, timeout=120, what=f"{EXAMPLE_NAME} Ready=True")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\noperator log:\n{proc.log_tail(60)}") from None
        assert (FIELD_MANAGER, "status") in field_managers(cluster, "modelservice", EXAMPLE_NAME,
                                                           namespace)
        assert (FIELD_MANAGER, "") in field_managers(cluster, "deployment",
                                                     f"{EXAMPLE_NAME}-default", namespace)

        def posted_event() -> bool:
            events = cluster.get_json("events", "-n", namespace,
                                      f"--field-selector=involvedObject.name={EXAMPLE_NAME}")
            return any(e["involvedObject"]["kind"] == "ModelService" for e in events["items"])

        cluster.wait_until(posted_event, timeout=15, what="the operator to post its Events")
    finally:
        proc.stop()
    log = proc.log_path.read_text(errors="replace")
    # a namespace an earlier test deleted refuses new objects with a 403 too (its reason on the
    # line or the next one): not a permission problem
    lines = log.splitlines()
    terminating = ("NamespaceTerminating", "is being terminated")
    denied = [line for i, line in enumerate(lines) if any(p in line for p in PERMISSION_ERRORS)
              and not any(t in " ".join(lines[i:i + 2]) for t in terminating)]
    assert not denied, "the operator was refused something:\n" + "\n".join(denied[:20])
    return log


def field_managers(cluster: Cluster, kind: str, name: str, namespace: str) -> set[tuple[str, str]]:
    obj = json.loads(cluster.kubectl("get", kind, name, "-n", namespace, "-o", "json",
                                     "--show-managed-fields").stdout)
    return {(m["manager"], m.get("subresource", "")) for m in obj["metadata"]["managedFields"]}


def can_i(cluster: Cluster, user: str, verb: str, resource: str, *scope: str) -> bool:
    """What `kubectl auth can-i VERB RESOURCE --as=USER` asks, as an explicit
    SubjectAccessReview: kubectl cannot name the group of a kind the cluster does not serve
    (KEDA's, Gateway API's), and RBAC grants on those must be checked all the same.
    `resource` is `plural[.group][/subresource]`; a service account gets its groups."""
    qualified, _, subresource = resource.partition("/")
    plural, _, group = qualified.partition(".")
    attributes = {"verb": verb, "resource": plural, "group": group, "subresource": subresource}
    if scope and scope[0] == "-n":
        attributes["namespace"] = scope[1]
    groups = ["system:authenticated"]
    if user.startswith("system:serviceaccount:"):
        groups += ["system:serviceaccounts", f"system:serviceaccounts:{user.split(':')[2]}"]
    review = {"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
              "spec": {"user": user, "groups": groups, "resourceAttributes": attributes}}
    out = cluster.kubectl("create", "-o", "json", "-f", "-", input=json.dumps(review)).stdout
    return json.loads(out)["status"].get("allowed", False)


# --- install and upgrade ----------------------------------------------------------------------

def test_install_prints_what_to_apply_next(release: Release) -> None:
    assert "kubectl apply -n default -f examples/cpu-minimal.yaml" in release.notes
    assert f"deployment/{release.fullname}" in release.notes


def test_upgrade_from_the_previous_version_applies_the_new_crd_schema(release: Release) -> None:
    before = release.before_upgrade
    assert before.returncode != 0 and NEW_FIELD[1] in before.stderr, (
        f"the previous chart's CRD accepted {NEW_FIELD}: {before.stdout}{before.stderr}")
    assert release.after_upgrade.returncode == 0
    charts = [h["chart"] for h in release.history]
    assert charts == [f"kubemaas-{PREVIOUS_VERSION}", "kubemaas-0.1.0"], release.history
    cluster = release.cluster
    crd = cluster.get_json("crd", CRD)
    assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    dep = cluster.get_json("deployment", release.fullname, "-n", release.namespace)
    assert dep["metadata"]["labels"]["app.kubernetes.io/version"] == "0.1.0"
    assert dep["spec"]["template"]["spec"]["serviceAccountName"] == release.service_account


# --- RBAC: enough ---------------------------------------------------------------------------------

def test_chart_service_account_reconciles_an_example(release: Release, namespace: str) -> None:
    reconcile_example_as(release, release.rendered_deployment(), namespace)


def test_watch_namespaces_mode_reconciles_with_roles_only(release: Release, namespace: str,
                                                          cluster: Cluster) -> None:
    scoped = Release(name=f"{release.name}ns", namespace=release.namespace, cluster=cluster,
                     tmp=release.tmp)
    settings = ("--set", "crds.install=false", "--set", "rbac.aggregateToDefaultRoles=false",
                "--set", f"watchNamespaces[0]={namespace}")
    scoped.helm("install", scoped.name, str(CHART), *settings)
    try:
        user = scoped.user
        assert can_i(cluster, user, "patch", "deployments.apps", "-n", namespace)
        assert not can_i(cluster, user, "list", "deployments.apps", "-n", "default")
        assert not can_i(cluster, user, "list", "deployments.apps", "--all-namespaces")
        assert not can_i(cluster, user, "list", MSVC, "--all-namespaces")
        assert can_i(cluster, user, "watch", "namespaces")
        assert can_i(cluster, user, "watch", "nodes")  # cluster-scoped: the GPU-fit check
        assert not can_i(cluster, user, "patch", "nodes")
        reconcile_example_as(scoped, scoped.rendered_deployment(*settings), namespace)
    finally:
        scoped.helm("uninstall", scoped.name, "--wait", check=False)


def test_model_cache_eviction_runs_with_the_charts_rules_only(release: Release, namespace: str,
                                                             cluster: Cluster) -> None:
    """modelCache.enabled: with nothing but its ServiceAccount token, the operator deletes a
    deleted ModelService's PV and runs the eviction Job in the release namespace, and may create
    or delete Jobs nowhere else."""
    cached = Release(name=f"{release.name}mc", namespace=release.namespace, cluster=cluster, tmp=release.tmp)
    settings = ("--set", "crds.install=false", "--set", "rbac.aggregateToDefaultRoles=false",
                "--set", "modelCache.enabled=true")
    cached.helm("install", cached.name, str(CHART), *settings)
    nodes = [n for n in cluster.get_json("nodes")["items"] if not n["spec"].get("taints")
             and (n["metadata"].get("annotations") or {}).get("kwok.x-k8s.io/node") == "fake"]
    node = min(n["metadata"]["name"] for n in nodes)
    cluster.kubectl("label", "node", node, "kubemaas.io/model-cache=true", "--overwrite")
    uri = f"hf://org/helm-{uuid.uuid4().hex[:6]}@abc123"
    proc = None
    try:
        user = cached.user
        assert can_i(cluster, user, "create", "jobs.batch", "-n", cached.namespace)
        assert not can_i(cluster, user, "create", "jobs.batch", "-n", namespace)
        # delete: a failed eviction Job, before the sweep writes it again; only its own
        assert can_i(cluster, user, "delete", "jobs.batch", "-n", cached.namespace)
        assert not can_i(cluster, user, "delete", "jobs.batch", "-n", namespace)
        assert can_i(cluster, user, "delete", "persistentvolumes")
        kubeconfig = service_account_kubeconfig(cluster, cached.namespace, cached.service_account,
                                                cached.tmp / f"mc-{uuid.uuid4().hex[:6]}.kubeconfig")
        proc = OperatorProcess(kubeconfig, chart_operator_env(cached.rendered_deployment(*settings))).start()
        ms = yaml.safe_load(EXAMPLE.read_text())
        ms["metadata"]["name"] = "cached"
        ms["spec"]["model"] = {"uri": uri, "format": "transformers", "task": "feature-extraction", "cache": "node"}
        cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(ms))
        cluster.wait_until(lambda: cluster.get_json("modelservice", "cached", "-n", namespace)
                           .get("status", {}).get("cacheSummary"), timeout=120, what="status.cacheSummary")
        cluster.kubectl("delete", "modelservice", "cached", "-n", namespace)
        # of this test's key: the sweep at start may evict entries other tests' runs left
        jobs = cluster.wait_until(lambda: cluster.get_json("jobs", "-n", cached.namespace, "-l",
                                                           f"kubemaas.io/model-cache-key={cache_key(uri)}")["items"],
                                  timeout=120, what="the eviction Job in the release namespace")
        assert [j["metadata"]["annotations"]["kubemaas.io/node"] for j in jobs] == [node]
        cluster.wait_until(lambda: cluster.kubectl("get", "pv", f"kubemaas-cache-{namespace}-cached",
                                                   check=False).returncode != 0,
                           timeout=60, what="the deleted ModelService's PV gone")
    finally:
        log = proc.log_path.read_text(errors="replace") if proc else ""
        if proc:
            proc.stop()
        cluster.kubectl("label", "node", node, "kubemaas.io/model-cache-", check=False)
        cluster.kubectl("delete", "pv", f"kubemaas-cache-{namespace}-cached",
                        f"kubemaas-cache-evict-{cached.namespace}", "--wait=false", check=False)
        cached.helm("uninstall", cached.name, "--wait", check=False)
    lines = log.splitlines()
    terminating = ("NamespaceTerminating", "is being terminated")  # another test's namespace going
    denied = [line for i, line in enumerate(lines) if any(p in line for p in PERMISSION_ERRORS)
              and not any(t in " ".join(lines[i:i + 2]) for t in terminating)]
    assert not denied, "the operator was refused something:\n" + "\n".join(denied[:20])


# --- RBAC: no more than needed ---------------------------------------------------------------------

NEEDED = [
    ("get", "modelservices.kubemaas.io"), ("list", "modelservices.kubemaas.io"),
    ("watch", "modelservices.kubemaas.io"), ("patch", "modelservices.kubemaas.io"),
    ("patch", "modelservices.kubemaas.io/status"),
    ("create", "deployments.apps"), ("patch", "deployments.apps"), ("delete", "deployments.apps"),
    ("patch", "services"), ("patch", "poddisruptionbudgets.policy"),
    ("patch", "horizontalpodautoscalers.autoscaling"), ("patch", "scaledobjects.keda.sh"),
    ("patch", "httproutes.gateway.networking.k8s.io"),
    ("patch", "networkpolicies.networking.k8s.io"),
    ("patch", "configmaps"),  # spec.adapters' <name>-adapters, in every mode
    ("list", "pods"), ("watch", "pods"), ("create", "events"),
    ("watch", "customresourcedefinitions.apiextensions.k8s.io"),
    ("list", "nodes"), ("watch", "nodes"),  # the GPU-fit check reads their GPU labels
]
REFUSED = [
    ("get", "secrets"), ("list", "secrets"), ("watch", "secrets"), ("create", "secrets"),
    ("watch", "configmaps"), ("create", "pods"), ("delete", "pods"), ("create", "pods/exec"),
    ("update", "deployments.apps"), ("update", "modelservices.kubemaas.io"),
    ("create", "modelservices.kubemaas.io"), ("delete", "modelservices.kubemaas.io"),
    ("update", "modelservices.kubemaas.io/status"), ("patch", "modelservices.kubemaas.io/scale"),
    ("create", "serviceaccounts/token"), ("impersonate", "serviceaccounts"),
    ("create", "rolebindings.rbac.authorization.k8s.io"),
    ("escalate", "clusterroles.rbac.authorization.k8s.io"),
    ("bind", "clusterroles.rbac.authorization.k8s.io"),
    ("create", "customresourcedefinitions.apiextensions.k8s.io"),
    ("patch", "customresourcedefinitions.apiextensions.k8s.io"),
    ("patch", "nodes"), ("delete", "nodes"), ("list", "namespaces"), ("delete", "namespaces"),
    ("delete", "events"), ("*", "*"),
]


def test_service_account_can_do_no_more_than_needed(release: Release, namespace: str) -> None:
    cluster, user = release.cluster, release.user
    for scope in (("-n", namespace), ("--all-namespaces",)):
        for verb, resource in NEEDED:
            assert can_i(cluster, user, verb, resource, *scope), f"cannot {verb} {resource} {scope}"
        for verb, resource in REFUSED:
            assert not can_i(cluster, user, verb, resource, *scope), f"may {verb} {resource} {scope}"


def test_service_account_rules_have_no_wildcards(release: Release, namespace: str) -> None:
    out = release.cluster.kubectl("auth", "can-i", "--list", f"--as={release.user}",
                                  "-n", namespace).stdout
    rows = [line.split(None, 3) for line in out.splitlines()[1:] if line.strip()]
    for row in rows:
        resource, verbs = row[0], row[-1]
        if not resource or resource.startswith(("/", "[")):
            continue  # non-resource URLs of system:discovery, every authenticated user's
        assert "*" not in resource and "[*]" not in verbs, row
        assert "secrets" not in resource, row


def test_namespace_users_manage_modelservices_through_aggregated_roles(release: Release,
                                                                       namespace: str) -> None:
    cluster = release.cluster
    cluster.kubectl("create", "rolebinding", "viewer", "--clusterrole=view", "--user=alice",
                    "-n", namespace)
    cluster.kubectl("create", "rolebinding", "editor", "--clusterrole=edit", "--user=bob",
                    "-n", namespace)

    def aggregated() -> bool:
        return can_i(cluster, "alice", "list", MSVC, "-n", namespace)

    cluster.wait_until(aggregated, timeout=30, what="the view role to aggregate ModelServices")
    assert not can_i(cluster, "alice", "create", MSVC, "-n", namespace)
    for verb in ("create", "patch", "delete"):
        assert can_i(cluster, "bob", verb, MSVC, "-n", namespace)
    assert can_i(cluster, "bob", "patch", f"{MSVC}/scale", "-n", namespace)
    assert not can_i(cluster, "bob", "list", MSVC, "-n", "default")


# --- uninstall --------------------------------------------------------------------------------------

def test_uninstall_leaves_no_operator_objects_and_keeps_modelservices(release: Release,
                                                                      namespace: str) -> None:
    cluster = release.cluster
    cluster.kubectl("apply", "-n", namespace, "-f", str(EXAMPLE))
    release.helm("uninstall", release.name, "--wait", "--timeout", "120s")
    selector = f"app.kubernetes.io/instance={release.name}"
    left = cluster.kubectl(
        "get", "deployments,serviceaccounts,services,roles,rolebindings,"
        "clusterroles,clusterrolebindings", "--all-namespaces", "-l", selector, "-o", "name")
    names = [n for n in left.stdout.split() if n]
    assert not names, f"left behind: {names}"
    names_by_prefix = cluster.kubectl("get", "clusterroles,clusterrolebindings", "-o", "name").stdout
    assert release.fullname not in names_by_prefix
    assert cluster.get_json("crd", CRD)["metadata"]["name"] == CRD
    assert cluster.get_json("modelservice", EXAMPLE_NAME, "-n", namespace)
    releases = json.loads(release.helm("list", "-o", "json").stdout)
    assert not [r for r in releases if r["name"] == release.name]
