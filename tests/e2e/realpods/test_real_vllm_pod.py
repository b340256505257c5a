"""The vLLM engine from a real pod: the operator (installed by the chart, with the light
`runtime-vllm` image as operator.runtimeImages.vllm) renders a ModelService with
`spec.runtime.engine: vllm`, the real node runs it, and the official openai client through the
Service gets vLLM's own offline greedy answers (tests/runtime/vllm_reference.py, run on this
machine from the vLLM venv on the same weights).

The light `runtime-vllm` image (hack/images --light runtime-vllm) holds only the project's code;
vLLM and its torch are the vLLM venv's site-packages (hack/vllm-venv), which the real node
mounts read-only at /opt/kubemaas/deps-vllm (hack/real-node.sh). The model is SmolLM2 as a
transformers directory (hack/smollm2-transformers) on a PVC (a hostPath PV), as the other
real-pod tests give theirs.

vLLM starts in about 150 s on this CPU, more under load: the test waits up to READY_TIMEOUT, and
the operator's startup probe allows the vLLM engine 600 s more than the builtin one. Run it
holding the real node's and the vLLM lock (docs/local-cluster.md, "The real-pod tier"). Without
the vLLM venv the module is skipped, except under CI=true, where it fails (`make test` builds
the venv first).

Its own module: the operator release here has the vLLM image set, and only one operator runs at
a time (the other module's release is gone before this one installs)."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.e2e.cluster import HACK_CLUSTER, Cluster, wait_for
from tests.e2e.msvc import condition, get
from tests.e2e.realpods.conftest import (
    IMAGE_TIMEOUT,
    ON_REAL_NODE,
    Images,
    OperatorRelease,
    installed_operator,
    pods_report,
    restricted_namespace,
)
from tests.e2e.realpods.images import REPO, images_cli
from tests.e2e.realpods.test_real_pods import apply, model_volume, runtime_pods, service_ip
from tests.models_on_disk import smollm2_transformers_dir, vllm_venv_python

# the cluster, three images, the operator and vLLM's start in a pod: past the default 900 s
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(2400)]

NAME = "smollm2-vllm"
QUESTIONS = ["What is the capital of France?", "Name three prime numbers."]
MAX_TOKENS = 16
# vLLM's start (~150 s idle here) in a pod on two cores that other sessions share, plus the
# operator's reconcile, the image's first start and kube-proxy's sync
READY_TIMEOUT = 1200
REFERENCE_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_LOGGING_LEVEL": "WARNING",
                 "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def vllm_python() -> Path:
    return vllm_venv_python()


@pytest.fixture(scope="module")
def smollm2_dir() -> Path:
    return smollm2_transformers_dir()


@pytest.fixture(scope="module")
def vllm_image(images: Images, vllm_python: Path) -> str:
    """The light runtime-vllm image, built and imported into the real node."""
    images_cli("build", "--light", "runtime-vllm", timeout=IMAGE_TIMEOUT)
    archive = images_cli("archive", "--light", "runtime-vllm")
    load = subprocess.run([str(HACK_CLUSTER), "load", archive], capture_output=True, text=True,
                          timeout=300, check=False)
    assert load.returncode == 0, f"hack/cluster load failed:\n{load.stderr}"
    return images_cli("ref", "--light", "runtime-vllm")


@pytest.fixture(scope="module")
def vllm_release(cluster: Cluster, crd: str, images: Images, vllm_image: str,
                 real_node: str) -> Iterator[OperatorRelease]:
    with installed_operator(cluster, images, "--set",
                            f"operator.runtimeImages.vllm={vllm_image}") as release:
        yield release


def vllm_modelservice(claim: str) -> dict:
    return {
        "apiVersion": "kubemaas.io/v1alpha1", "kind": "ModelService", "metadata": {"name": NAME},
        "spec": {
            "model": {"uri": f"pvc://{claim}", "format": "transformers", "task": "text-generation",
                      "parameterCount": "135M"},
            "resources": {"cpu": "1", "memory": "6Gi"},
            "runtime": {"engine": "vllm", "maxModelLen": 2048, "maxNumSeqs": 4,
                        "kvCacheTokens": 4096},
            "scheduling": ON_REAL_NODE,
        },
    }


@pytest.fixture(scope="module")
def served(cluster: Cluster, vllm_release: OperatorRelease, smollm2_dir: Path, vllm_python: Path,
           tmp_path_factory) -> Iterator[tuple[str, list[dict]]]:
    """(namespace, vLLM's offline answers) once the ModelService is Ready. The reference runs on
    this machine while the pod starts."""
    work = tmp_path_factory.mktemp("vllm-pod")
    requests = work / "requests.json"
    requests.write_text(json.dumps({"max_tokens": MAX_TOKENS, "chats": [
        [{"role": "user", "content": q}] for q in QUESTIONS]}))
    answers, log_path = work / "answers.json", work / "reference.log"
    namespace = restricted_namespace(cluster, "rp-vllm")

    def report() -> str:
        return f"{pods_report(cluster, namespace)}\n--- operator log\n{vllm_release.logs()}"

    with open(log_path, "wb") as log:
        reference = subprocess.Popen(
            [str(vllm_python), str(REPO / "tests" / "runtime" / "vllm_reference.py"),
             str(smollm2_dir), str(requests), str(answers)],
            env={**os.environ, **REFERENCE_ENV}, stdout=log, stderr=subprocess.STDOUT)
        try:
            model_volume(cluster, namespace, "smollm2", smollm2_dir)
            apply(cluster, namespace, vllm_modelservice("smollm2"))

            def ready() -> dict | None:
                ms = get(cluster, namespace, NAME)
                cond = condition(ms, "Ready") or {}
                current = ms.get("status", {}).get("observedGeneration") == ms["metadata"]["generation"]
                return ms if cond.get("status") == "True" and current else None

            wait_for(ready, READY_TIMEOUT, f"{namespace}/{NAME} Ready", report, interval=5)
            assert reference.wait(900) == 0, log_path.read_text(errors="replace")[-4000:]
            yield namespace, json.loads(answers.read_text())
        finally:
            if reference.poll() is None:
                reference.kill()
            reference.wait()
            cluster.kubectl("delete", "namespace", namespace, "--wait=false", check=False)


def test_the_operator_runs_the_vllm_flavour_with_probes_sized_for_it(cluster: Cluster, served,
                                                                    vllm_image: str, real_node: str):
    namespace, _ = served
    (pod,) = runtime_pods(cluster, namespace, NAME)
    assert pod["spec"]["nodeName"] == real_node
    (container,) = pod["spec"]["containers"]
    assert container["image"] == vllm_image
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["KUBEMAAS_ENGINE"] == "vllm"
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600, startup
    (status,) = pod["status"]["containerStatuses"]
    assert status["ready"] and status["restartCount"] == 0, status


def test_greedy_chat_through_the_service_equals_vllms_offline_greedy(cluster: Cluster, served):
    namespace, reference = served
    client = openai.OpenAI(base_url=f"http://{service_ip(cluster, namespace, NAME)}/v1",
                           api_key="unused", max_retries=0, timeout=300)
    assert [m.id for m in client.models.list().data] == [NAME]
    for question, expected in zip(QUESTIONS, reference, strict=True):
        messages = [{"role": "user", "content": question}]
        result = client.chat.completions.create(model=NAME, messages=messages,
                                                max_tokens=MAX_TOKENS, temperature=0)
        assert result.choices[0].message.content == expected["text"], question
        assert result.choices[0].finish_reason == expected["finish_reason"]
        assert result.usage.prompt_tokens == expected["prompt_tokens"]
        assert result.usage.completion_tokens == expected["completion_tokens"]
        chunks = list(client.chat.completions.create(model=NAME, messages=messages,
                                                     max_tokens=MAX_TOKENS, temperature=0,
                                                     stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
            expected["text"], question
