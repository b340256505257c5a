"""Dynamic batching under concurrency, a full queue, SIGTERM draining, and failed starts."""

from __future__ import annotations

import asyncio
import subprocess
import time

import httpx
import numpy as np
import pytest

from tests.runtime.conftest import PYTHON, RuntimeServer, runtime_env
from tests.runtime.tiny_models import build_safetensors

LABELS = 'model="slow",variant="default"'


def slow_server_args(model_dir, *extra):
    return ["--model-uri", f"file://{model_dir}", "--format", "safetensors", "--name", "slow",
            "--architecture", "tests.runtime.tiny_models:make_slow_mlp", *extra]


def body(rows: int = 1) -> dict:
    x = np.ones((rows, 4), dtype=np.float32)
    return {"inputs": [{"name": "x", "datatype": "FP32", "shape": [rows, 4],
                        "data": x.reshape(-1).tolist()}]}


async def fire(url: str, count: int, rows: int = 1) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        return await asyncio.gather(*[client.post("/v2/models/slow/infer", json=body(rows))
                                      for _ in range(count)])


@pytest.fixture(scope="module")
def slow_server(module_tmp):
    build_safetensors(module_tmp / "slow", slow_delay_s=0.15)
    server = RuntimeServer(slow_server_args(module_tmp / "slow", "--max-batch-size", "4",
                                            "--max-queue", "6"), module_tmp).start()
    yield server
    assert server.stop() == 0, server.logs()


def test_requests_arriving_while_busy_are_batched(slow_server):
    batches_before = slow_server.metric("kubemaas_batch_size_count", LABELS)
    rows_before = slow_server.metric("kubemaas_batch_size_sum", LABELS)
    responses = asyncio.run(fire(slow_server.url, 6))
    assert [r.status_code for r in responses] == [200] * 6
    batches = slow_server.metric("kubemaas_batch_size_count", LABELS) - batches_before
    rows = slow_server.metric("kubemaas_batch_size_sum", LABELS) - rows_before
    assert rows == 6
    assert batches < 6, "no two requests shared a forward pass"
    assert slow_server.metric("kubemaas_queue_wait_seconds_count", LABELS) >= 6
    assert slow_server.metric("kubemaas_inference_seconds_count", LABELS) >= batches


def test_full_queue_answers_503_with_retry_after(slow_server):
    responses = asyncio.run(fire(slow_server.url, 24))
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 503} and 200 in codes and 503 in codes, codes
    for response in responses:
        if response.status_code == 503:
            assert response.headers["retry-after"] == "1"
            assert "queue is full" in response.json()["error"]
    after = httpx.post(f"{slow_server.url}/v2/models/slow/infer", json=body(), timeout=30)
    assert after.status_code == 200
    assert slow_server.metric("kubemaas_request_failures_total", 'code="503"') >= 1


def test_request_larger_than_max_batch_is_400(slow_server):
    response = httpx.post(f"{slow_server.url}/v2/models/slow/infer", json=body(5), timeout=30)
    assert response.status_code == 400 and "max batch size is 4" in response.json()["error"]


def test_liveness_answers_while_the_model_is_busy(slow_server):
    async def scenario():
        busy = asyncio.create_task(fire(slow_server.url, 4))
        await asyncio.sleep(0.05)
        async with httpx.AsyncClient(base_url=slow_server.url, timeout=30) as client:
            live = await client.get("/v2/health/live")
        await busy
        return live

    assert asyncio.run(scenario()).status_code == 200


def wait_until_live(server: RuntimeServer) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert server.process.poll() is None, server.logs()
        try:
            if httpx.get(f"{server.url}/v2/health/live", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.05)
    raise AssertionError(f"never live:\n{server.logs()}")


def test_loading_then_sigterm_drains_in_flight_requests(module_tmp):
    build_safetensors(module_tmp / "drain", slow_delay_s=0.3, load_delay_s=4)
    server = RuntimeServer(slow_server_args(module_tmp / "drain", "--max-batch-size", "2",
                                            "--unready-delay-seconds", "1.5"), module_tmp).launch()
    try:
        wait_until_live(server)  # live while the model still loads, but not ready
        ready = httpx.get(f"{server.url}/v2/health/ready")
        assert ready.status_code == 503 and ready.json()["error"] == "model is loading"
        early = httpx.post(f"{server.url}/v2/models/slow/infer", json=body())
        assert early.status_code == 503 and early.json() == {"error": "model is loading"}
        server.start()
        async def scenario():
            in_flight = asyncio.create_task(fire(server.url, 6))
            deadline = time.monotonic() + 20
            while server.metric("kubemaas_inflight_requests", LABELS) < 6:
                assert time.monotonic() < deadline, "requests never arrived"
                await asyncio.sleep(0.02)
            server.terminate()
            await asyncio.sleep(0.2)
            async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
                ready = await client.get("/v2/health/ready")
                late = await client.post("/v2/models/slow/infer", json=body())
            return await in_flight, ready, late

        responses, ready, late = asyncio.run(scenario())
        assert [r.status_code for r in responses] == [200] * 6
        assert ready.status_code == 503 and ready.json()["ready"] is False
        assert late.status_code == 200  # still served while endpoints catch up
        assert server.process.wait(30) == 0, server.logs()
    finally:
        server.stop()


def test_requests_still_queued_when_the_drain_ends_get_503_not_a_reset(module_tmp):
    build_safetensors(module_tmp / "queued", slow_delay_s=0.5)
    server = RuntimeServer(slow_server_args(module_tmp / "queued", "--max-batch-size", "1",
                                            "--drain-seconds", "2"), module_tmp).start()
    try:
        async def scenario():
            async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
                calls = [asyncio.create_task(client.post("/v2/models/slow/infer", json=body()))
                         for _ in range(10)]
                deadline = time.monotonic() + 20
                while server.metric("kubemaas_inflight_requests", LABELS) < 10:
                    assert time.monotonic() < deadline, "requests never arrived"
                    await asyncio.sleep(0.02)
                server.terminate()
                # a reset connection would raise here instead of returning a response
                return await asyncio.gather(*calls)

        responses = asyncio.run(scenario())
        codes = [r.status_code for r in responses]
        assert set(codes) == {200, 503}, codes  # 10 x 0.5 s cannot finish in a 2 s drain
        for response in responses:
            if response.status_code == 503:
                assert "shutting down" in response.json()["error"]
                assert response.headers["retry-after"] == "1"
        assert server.process.wait(30) == 0, server.logs()
    finally:
        server.stop()


def run_failing(args: list[str], tmp_path) -> tuple[int, str, str]:
    log = tmp_path / "termination-log"
    result = subprocess.run(
        [PYTHON, "-m", "kubemaas_runtime", "serve", "--host", "127.0.0.1", "--port", "1",
         "--termination-log", str(log), *args],
        env=runtime_env(), capture_output=True, text=True, check=False, timeout=120)
    return result.returncode, log.read_text() if log.exists() else "", result.stderr


@pytest.mark.parametrize("args, reason", [
    (["--model-uri", "file:///nonexistent/model.pt", "--format", "torchscript"],
     "ModelLoadFailed: model path /nonexistent/model.pt does not exist"),
    (["--model-uri", "file:///tmp", "--format", "safetensors", "--architecture", "no.such:f"],
     "ModelLoadFailed: "),
    (["--model-uri", "file:///tmp", "--format", "torchscript", "--device", "cuda"],
     "ModelLoadFailed: --device cuda was requested but no CUDA device is visible"),
    # an engine or a GPU split this runtime cannot run is refused, never ignored
    (["--model-uri", "file:///tmp", "--format", "torchscript", "--engine", "vllm"],
     "ModelLoadFailed: --engine vllm: vLLM serves --task text-generation here, not a tensor model"),
    (["--model-uri", "file:///tmp", "--format", "gguf", "--tensor-parallel-size", "2"],
     ("ModelLoadFailed: the builtin engine cannot split a model over several GPUs "
      "(--tensor-parallel-size 2; auto: ")),
])
def test_failed_start_writes_one_line_reason(args, reason, tmp_path):
    code, log, stderr = run_failing(args, tmp_path)
    assert code != 0, stderr
    assert log.startswith(reason), (log, stderr)
    assert log.count("\n") == 1
