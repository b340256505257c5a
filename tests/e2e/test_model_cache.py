"""spec.model.cache node on the local control plane: the operator's local PV and claim bind, and
its pods land only on the cache's node group (the PV's required node affinity, through the real
scheduler); status.cache follows the fetch containers' termination messages, and an entry no
ModelService refers to gets its eviction Job. The fetch skip on a second pod, and what
cache-evict removes, are the runtime's (tests/runtime/test_fetch.py, test_cache_evict.py)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator

import pytest
from kubemaas_operator.builders import build_children
from kubemaas_operator.builders.model_cache import CACHE_KEY_LABEL, cache_key
from kubemaas_operator.builders.naming import FETCH_CONTAINER
from kubemaas_operator.settings import OperatorSettings

from tests.e2e.cluster import Cluster
from tests.e2e.msvc import apply, get, modelservice
from tests.e2e.operator_process import OperatorProcess
from tests.unit.support import make_ms

pytestmark = pytest.mark.e2e

LABEL = "kubemaas.io/model-cache"


def _untainted_node(cluster: Cluster) -> str:
    nodes = [n for n in cluster.get_json("nodes")["items"] if not n["spec"].get("taints")]
    assert nodes, "the local cluster has an untainted node"
    return min(n["metadata"]["name"] for n in nodes)


def test_cached_pods_bind_the_local_volume_and_land_on_the_cache_nodes(cluster: Cluster, namespace: str) -> None:
    node = _untainted_node(cluster)
    cluster.kubectl("label", "node", node, f"{LABEL}=true", "--overwrite")
    ms = make_ms({"model": {"uri": "hf://org/m@abc123", "format": "transformers", "task": "feature-extraction",
                            "cache": "node"}, "replicas": 2}, namespace=namespace)
    settings = OperatorSettings(model_cache=True)
    objs = [o for o in build_children(ms, settings, runtime_image="registry.invalid/pause:1")
            if o["kind"] in ("PersistentVolume", "PersistentVolumeClaim", "Deployment")]
    volume = next(o for o in objs if o["kind"] == "PersistentVolume")
    for obj in objs:
        obj["metadata"].pop("ownerReferences", None)  # no ModelService object in this test
        cluster.kubectl("apply", "-f", "-", input=json.dumps(obj))
    try:
        claim = volume["spec"]["claimRef"]["name"]
        cluster.wait_until(
            lambda: cluster.get_json("pvc", claim, "-n", namespace)["status"].get("phase") == "Bound",
            timeout=60, what="the cache claim bound")
        def scheduled() -> list[str]:
            pods = cluster.get_json("pods", "-n", namespace, "-l", "kubemaas.io/modelservice=m")["items"]
            return [p["spec"].get("nodeName", "") for p in pods]
        cluster.wait_until(lambda: len(scheduled()) == 2 and all(scheduled()), timeout=90, what="2 pods scheduled")
        assert set(scheduled()) == {node}  # the only node of the group: both replicas share its copy
    finally:
        cluster.kubectl("delete", "pv", volume["metadata"]["name"], "--wait=false", check=False)
        cluster.kubectl("label", "node", node, f"{LABEL}-", check=False)


def _kwok_node(cluster: Cluster) -> str:
    """An untainted simulated node (KWOK), never the real one: these pods only need scheduling."""
    nodes = [n for n in cluster.get_json("nodes")["items"] if not n["spec"].get("taints")
             and (n["metadata"].get("annotations") or {}).get("kwok.x-k8s.io/node") == "fake"]
    assert nodes, "the local cluster has an untainted KWOK node"
    return min(n["metadata"]["name"] for n in nodes)


@pytest.fixture
def cache_operator(cluster: Cluster, crd: str) -> Iterator[tuple[OperatorProcess, str]]:
    """The operator with its model cache on, evicting into a namespace of its own."""
    evict_ns = f"evict-{uuid.uuid4().hex[:8]}"
    cluster.kubectl("create", "namespace", evict_ns)
    proc = OperatorProcess(cluster.kubeconfig, extra_env={
        "KUBEMAAS_OPERATOR_MODEL_CACHE": "true", "KUBEMAAS_OPERATOR_MODEL_CACHE_EVICTION_NAMESPACE": evict_ns,
        "KUBEMAAS_OPERATOR_NETWORK_POLICY": "false"}).start()
    try:
        yield proc, evict_ns
    finally:
        proc.stop()
        cluster.kubectl("delete", "namespace", evict_ns, "--wait=false", check=False)
        cluster.kubectl("delete", "pv", f"kubemaas-cache-evict-{evict_ns}", "--wait=false", check=False)


def _cached(name: str, uri: str) -> dict:
    ms = modelservice(name, replicas=2, uri=uri, image="registry.invalid/pause:1")
    ms["spec"]["model"]["cache"] = "node"
    return ms


def _report_fetch(cluster: Cluster, namespace: str, pod: str, line: str) -> None:
    """What the kubelet writes when the fetch init container exits (KWOK's simulated pods run no
    container, so no termination message of their own): the pod's status, through the API."""
    status = {"status": {"initContainerStatuses": [{
        "name": FETCH_CONTAINER, "image": "registry.invalid/pause:1", "imageID": "", "ready": True,
        "restartCount": 0, "started": False,
        "state": {"terminated": {"exitCode": 0, "reason": "Completed", "message": line,
                                 "startedAt": "2026-01-01T00:00:00Z", "finishedAt": "2026-01-01T00:01:00Z"}}}]}}
    cluster.kubectl("patch", "pod", pod, "-n", namespace, "--subresource=status", "--type=merge",
                    "-p", json.dumps(status))


def test_cache_status_per_node_and_eviction_when_no_modelservice_refers(
        cluster: Cluster, namespace: str, cache_operator: tuple[OperatorProcess, str]) -> None:
    _, evict_ns = cache_operator
    node = _kwok_node(cluster)
    uri = f"hf://org/m-{uuid.uuid4().hex[:6]}@abc123"  # a key of this test alone
    key = cache_key(uri)
    other_ns = f"t-{uuid.uuid4().hex[:8]}"
    cluster.kubectl("label", "node", node, f"{LABEL}=true", "--overwrite")
    cluster.kubectl("create", "namespace", other_ns)
    try:
        apply(cluster, namespace, _cached("m", uri))

        def pods_on_node() -> list[dict]:
            pods = cluster.get_json("pods", "-n", namespace, "-l", "kubemaas.io/modelservice=m")["items"]
            return pods if len(pods) == 2 and all(p["spec"].get("nodeName") == node for p in pods) else []

        pods = cluster.wait_until(pods_on_node, timeout=90, what="2 cached pods on the cache node")

        def cache_status(summary: str) -> list[dict] | None:
            status = get(cluster, namespace, "m").get("status", {})
            return status.get("cache") if status.get("cacheSummary") == summary else None

        # no report yet (KWOK writes no termination message): the node is listed, not ready
        (listed,) = cluster.wait_until(lambda: cache_status("0/1 nodes"), timeout=60, what="cacheSummary 0/1 nodes")
        assert (listed["node"], listed["key"], listed["ready"], listed["pods"]) == (node, key, False, 2)

        line = "KubemaasCache: " + json.dumps({"bytes": 4096, "cache": "filled", "key": key,
                                               "revision": "abc123", "uri": uri})
        _report_fetch(cluster, namespace, pods[0]["metadata"]["name"], line)
        (ready,) = cluster.wait_until(lambda: cache_status("1/1 nodes"), timeout=60, what="cacheSummary 1/1 nodes")
        assert ready == {"node": node, "key": key, "revision": "abc123", "bytes": 4096, "ready": True, "pods": 2,
                         "lastResult": "Filled", "lastResultTime": "2026-01-01T00:01:00Z"}
        table = cluster.kubectl("get", "msvc", "m", "-n", namespace, "-o", "wide").stdout  # a wide column
        assert "CACHED" in table.splitlines()[0] and "1/1 nodes" in table

        # another ModelService of the same model elsewhere: deleting the first evicts nothing
        apply(cluster, other_ns, _cached("m2", uri))
        cluster.wait_until(lambda: get(cluster, other_ns, "m2").get("status", {}).get("cacheSummary"),
                           timeout=60, what="the second ModelService reconciled")
        cluster.kubectl("delete", "msvc", "m", "-n", namespace)
        cluster.wait_until(lambda: not cluster.get_json("pods", "-n", namespace)["items"], timeout=90,
                           what="the first ModelService's pods gone")
        cluster.wait_until(lambda: cluster.kubectl("get", "pv", f"kubemaas-cache-{namespace}-m",
                                                   check=False).returncode != 0,
                           timeout=60, what="its PV deleted with it")
        def jobs() -> list[dict]:  # of this test's key (other tests' pods may leave theirs)
            return cluster.get_json("jobs", "-n", evict_ns, "-l", f"{CACHE_KEY_LABEL}={key}")["items"]

        time.sleep(3)  # the last pod's DELETED event has been handled by now
        assert jobs() == [], "a key another ModelService still refers to is not evicted"

        # the last one gone: one Job on the cache node removes the entry
        cluster.kubectl("delete", "msvc", "m2", "-n", other_ns)

        (job,) = cluster.wait_until(jobs, timeout=120, what="the eviction Job")
        pod = job["spec"]["template"]["spec"]
        assert pod["containers"][0]["args"][:5] == ["cache-evict", "--root", "/cache", "--key", key]
        (term,) = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
            "nodeSelectorTerms"]
        assert term["matchFields"] == [{"key": "metadata.name", "operator": "In", "values": [node]}]
        claim = cluster.wait_until(
            lambda: cluster.get_json("pvc", "kubemaas-cache-evict", "-n", evict_ns)["status"].get("phase") == "Bound",
            timeout=60, what="the eviction claim bound to its local PV")
        assert claim
        job_pod = cluster.wait_until(
            lambda: next(iter(cluster.get_json("pods", "-n", evict_ns, "-l",
                                               f"job-name={job['metadata']['name']}")["items"]), None),
            timeout=60, what="the eviction Job's pod")
        cluster.wait_until(lambda: cluster.get_json("pod", job_pod["metadata"]["name"], "-n", evict_ns)
                           ["spec"].get("nodeName") == node, timeout=60, what="the Job's pod on the cache node")
    finally:
        cluster.kubectl("delete", "namespace", other_ns, "--wait=false", check=False)
        for name in (f"kubemaas-cache-{namespace}-m", f"kubemaas-cache-{other_ns}-m2"):
            cluster.kubectl("delete", "pv", name, "--wait=false", check=False)
        cluster.kubectl("label", "node", node, f"{LABEL}-", check=False)


def test_a_changed_revision_evicts_the_old_entry_once_its_pods_are_gone(
        cluster: Cluster, namespace: str, cache_operator: tuple[OperatorProcess, str]) -> None:
    """A URI change moves the PV's key label at once, but the old entry is evicted only after
    the rollout removed the last pod of the old key; the new key is left alone."""
    _, evict_ns = cache_operator
    node = _kwok_node(cluster)
    stem = f"hf://org/r-{uuid.uuid4().hex[:6]}"
    old, new = cache_key(f"{stem}@aaa111"), cache_key(f"{stem}@bbb222")
    cluster.kubectl("label", "node", node, f"{LABEL}=true", "--overwrite")

    def pods(key: str) -> list[dict]:
        return cluster.get_json("pods", "-n", namespace, "-l", f"{CACHE_KEY_LABEL}={key}")["items"]

    def jobs(key: str) -> list[dict]:
        return cluster.get_json("jobs", "-n", evict_ns, "-l", f"{CACHE_KEY_LABEL}={key}")["items"]

    try:
        apply(cluster, namespace, _cached("r", f"{stem}@aaa111"))
        cluster.wait_until(lambda: len(pods(old)) == 2, timeout=90, what="2 pods of the first revision")
        apply(cluster, namespace, _cached("r", f"{stem}@bbb222"))
        cluster.wait_until(lambda: len(pods(new)) == 2 and not pods(old), timeout=120,
                           what="the rollout to the new revision")
        (job,) = cluster.wait_until(lambda: jobs(old), timeout=60, what="the old entry's eviction Job")
        assert job["spec"]["template"]["spec"]["containers"][0]["args"][4] == old
        assert jobs(new) == []  # in use
        volume = cluster.get_json("pv", f"kubemaas-cache-{namespace}-r")
        assert volume["metadata"]["labels"][CACHE_KEY_LABEL] == new
    finally:
        cluster.kubectl("delete", "msvc", "r", "-n", namespace, "--wait=false", check=False)
        cluster.kubectl("delete", "pv", f"kubemaas-cache-{namespace}-r", "--wait=false", check=False)
        cluster.kubectl("label", "node", node, f"{LABEL}-", check=False)


class _UnseenDeletion:
    """A cached ModelService `name` on one labelled KWOK node, deleted while the operator is
    stopped (`delete_while_stopped`): what the sweep then finds, as the e2e reads it."""

    def __init__(self, cluster: Cluster, namespace: str, evict_ns: str, name: str) -> None:
        self.cluster, self.namespace, self.evict_ns, self.name = cluster, namespace, evict_ns, name
        self.node = _kwok_node(cluster)
        self.uri = f"hf://org/{name}-{uuid.uuid4().hex[:6]}@abc123"
        self.key = cache_key(self.uri)
        self.volume = f"kubemaas-cache-{namespace}-{name}"
        cluster.kubectl("label", "node", self.node, f"{LABEL}=true", "--overwrite")

    def jobs(self) -> list[dict]:
        return self.cluster.get_json("jobs", "-n", self.evict_ns, "-l", f"{CACHE_KEY_LABEL}={self.key}")["items"]

    def phase(self) -> str | None:
        out = self.cluster.kubectl("get", "pv", self.volume, "-o", "json", check=False)
        return json.loads(out.stdout)["status"].get("phase") if out.returncode == 0 else None

    def delete_while_stopped(self, proc: OperatorProcess) -> None:
        """Two cached pods and the PV bound; the operator stopped; the ModelService deleted and
        its pods gone with the garbage collector, so its PV is left Released (its claim gone)."""
        cluster, namespace = self.cluster, self.namespace
        apply(cluster, namespace, _cached(self.name, self.uri))
        cluster.wait_until(lambda: len(cluster.get_json("pods", "-n", namespace, "-l",
                                                        f"{CACHE_KEY_LABEL}={self.key}")["items"]) == 2,
                           timeout=90, what="2 cached pods")
        cluster.wait_until(lambda: self.phase() == "Bound", timeout=60, what="the cache PV bound")
        proc.stop()
        cluster.kubectl("delete", "msvc", self.name, "-n", namespace)
        cluster.wait_until(lambda: not cluster.get_json("pods", "-n", namespace)["items"], timeout=90,
                           what="the pods gone with the garbage collector")
        cluster.wait_until(lambda: self.phase() == "Released", timeout=60, what="the PV Released, its claim gone")

    def clean_up(self) -> None:
        self.cluster.kubectl("delete", "msvc", self.name, "-n", self.namespace, "--wait=false", check=False)
        self.cluster.kubectl("delete", "pv", self.volume, "--wait=false", check=False)
        self.cluster.kubectl("label", "node", self.node, f"{LABEL}-", check=False)


def test_a_modelservice_deleted_while_the_operator_is_stopped_is_evicted_at_its_start(
        cluster: Cluster, namespace: str, cache_operator: tuple[OperatorProcess, str]) -> None:
    """No watch event tells the operator of a deletion while it is stopped: what remains is the
    ModelService's PV, Released (its claim went with the garbage collector once its pods were
    gone). The sweep at start finds the key and runs the eviction Job; the PV stays, the key's
    record, until that Job succeeded (the next test), and a ModelService created again under the
    name binds it."""
    proc, evict_ns = cache_operator
    entry = _UnseenDeletion(cluster, namespace, evict_ns, "s")
    try:
        entry.delete_while_stopped(proc)
        assert entry.jobs() == []  # nobody evicted it

        proc.start()
        (job,) = cluster.wait_until(entry.jobs, timeout=60, what="the sweep's eviction Job")
        assert job["metadata"]["annotations"]["kubemaas.io/node"] == entry.node
        assert job["spec"]["template"]["spec"]["containers"][0]["args"][:5] == [
            "cache-evict", "--root", "/cache", "--key", entry.key]
        assert entry.phase() == "Released", "kept while its eviction Job has not succeeded"

        # created again under the same name meanwhile: its claim binds that PV (the operator
        # removes the gone claim's uid), rather than waiting on an eviction its pods now block
        apply(cluster, namespace, _cached("s", entry.uri))
        cluster.wait_until(lambda: entry.phase() == "Bound", timeout=60, what="the kept PV bound to the new claim")
        # the PV controller writes the PV's phase first, then the claim's: wait for both
        claim = cluster.wait_until(
            lambda: (c := cluster.get_json("pvc", "s-model-cache", "-n", namespace))["status"].get("phase") == "Bound"
            and c, timeout=60, what="the new claim Bound")
        assert claim["spec"]["volumeName"] == entry.volume
    finally:
        entry.clean_up()


def _finish_job(cluster: Cluster, namespace: str, job: str, succeeded: bool) -> None:
    """What the Job controller writes once a Job's pods succeeded or ran out of retries (KWOK's
    pods run no container, so none ends by itself): its terminal condition, through the status
    subresource, with the conditions the API server requires before it (SuccessCriteriaMet,
    FailureTarget) and the startTime the controller set."""
    cluster.wait_until(lambda: cluster.get_json("job", job, "-n", namespace).get("status", {}).get("startTime"),
                       timeout=60, what=f"the Job controller started {job}")
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    first, last, reason = (("SuccessCriteriaMet", "Complete", "CompletionsReached") if succeeded
                           else ("FailureTarget", "Failed", "BackoffLimitExceeded"))
    status: dict = {"active": 0, "ready": 0, "terminating": 0, "succeeded" if succeeded else "failed": 1,
                    "conditions": [{"type": t, "status": "True", "reason": reason, "message": "set by the test",
                                    "lastProbeTime": now, "lastTransitionTime": now} for t in (first, last)]}
    if succeeded:
        status["completionTime"] = now
    cluster.kubectl("patch", "job", job, "-n", namespace, "--subresource=status", "--type=merge",
                    "-p", json.dumps({"status": status}))


def test_a_failed_eviction_is_run_again_and_the_volume_stays_until_it_succeeded(
        cluster: Cluster, namespace: str, crd: str) -> None:
    """A node unreachable while its eviction Job runs: the Job fails after its retries. A later
    pass of the sweep (every 30 s here) deletes it and writes a new one, and the deleted
    ModelService's Released PV, the key's record, stays until the new Job succeeded; then the
    sweep deletes it."""
    evict_ns = f"evict-{uuid.uuid4().hex[:8]}"
    cluster.kubectl("create", "namespace", evict_ns)
    proc = OperatorProcess(cluster.kubeconfig, extra_env={
        "KUBEMAAS_OPERATOR_MODEL_CACHE": "true", "KUBEMAAS_OPERATOR_MODEL_CACHE_EVICTION_NAMESPACE": evict_ns,
        "KUBEMAAS_OPERATOR_MODEL_CACHE_SWEEP_SECONDS": "30", "KUBEMAAS_OPERATOR_NETWORK_POLICY": "false"}).start()
    entry = _UnseenDeletion(cluster, namespace, evict_ns, "f")
    jobs, phase = entry.jobs, entry.phase
    try:
        entry.delete_while_stopped(proc)  # its PV is left Released, the key's record for the sweep
        proc.start()
        (first,) = cluster.wait_until(jobs, timeout=60, what="the sweep's eviction Job")
        first_name = first["metadata"]["name"]
        assert phase() == "Released", "the PV stays while its Job runs"

        _finish_job(cluster, evict_ns, first_name, succeeded=False)
        (retry,) = cluster.wait_until(lambda: [j for j in jobs() if j["metadata"]["name"] != first_name
                                               and not j["metadata"].get("deletionTimestamp")],
                                      timeout=120, what="a later pass writing the eviction Job again")
        assert retry["metadata"]["annotations"]["kubemaas.io/node"] == entry.node
        assert retry["spec"]["template"]["spec"]["containers"][0]["args"][:5] == [
            "cache-evict", "--root", "/cache", "--key", entry.key]
        cluster.wait_until(lambda: all(j["metadata"]["name"] != first_name for j in jobs()), timeout=60,
                           what="the failed Job deleted")
        assert phase() == "Released", "the PV stays until the eviction succeeded"

        _finish_job(cluster, evict_ns, retry["metadata"]["name"], succeeded=True)
        cluster.wait_until(lambda: phase() is None, timeout=120, what="the Released PV deleted once it succeeded")
        assert [j["metadata"]["name"] for j in jobs()] == [retry["metadata"]["name"]], \
            "no Job beside the one that succeeded"
    finally:
        proc.stop()
        entry.clean_up()
        cluster.kubectl("delete", "namespace", evict_ns, "--wait=false", check=False)
        cluster.kubectl("delete", "pv", f"kubemaas-cache-evict-{evict_ns}", "--wait=false", check=False)
