"""Generation under pressure on a real server: a full queue (503), abandoned streams
cancelled, SIGTERM draining running streams, and the quantization gate for generation.
A tiny random causal LM with a long context makes long sequences cheap."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from tests.runtime.conftest import RuntimeServer
from tests.runtime.test_batching_and_lifecycle import run_failing
from tests.runtime.tiny_llm import build_tiny_llm

LABELS = 'model="tiny"'
LONG = 8000  # tokens: seconds of decoding for the tiny model


@pytest.fixture(scope="module")
def long_dir(module_tmp):
    return build_tiny_llm(module_tmp / "tiny-long", context=8192)


def serve_args(directory, *extra):
    return ["--model-uri", f"file://{directory}", "--format", "transformers", "--task",
            "text-generation", "--name", "tiny", *extra]


def completion(prompt="hello", max_tokens=LONG, stream=False):
    return {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "stream": stream}


def wait_for_metric(server, name, predicate, timeout=120.0):
    """Liveness bound only (never a performance assertion)."""
    deadline = time.monotonic() + timeout
    while True:
        value = server.metric(name, LABELS)
        if predicate(value):
            return value
        assert time.monotonic() < deadline, f"{name} stayed at {value}"
        time.sleep(0.02)


def read_stream(url, body, lines: list, first: threading.Event | None = None,
                leave: threading.Event | None = None):
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as response:
        for line in response.iter_lines():
            if line:
                lines.append(line)
                if first is not None:
                    first.set()
            if leave is not None and leave.is_set():
                return


def test_full_queue_is_503_with_retry_after(module_tmp, long_dir):
    server = RuntimeServer(serve_args(long_dir, "--max-num-seqs", "1", "--max-queue", "1"),
                           module_tmp).start()
    try:
        lines: list[str] = []
        leave = threading.Event()
        running = threading.Thread(target=read_stream, args=(
            server.url, completion(stream=True), lines, None, leave), daemon=True)
        running.start()
        wait_for_metric(server, "kubemaas_num_requests_running", lambda v: v == 1)
        waiting_result: list[httpx.Response] = []
        waiter = threading.Thread(target=lambda: waiting_result.append(httpx.post(
            f"{server.url}/v1/completions", json=completion(max_tokens=2), timeout=120)),
            daemon=True)
        waiter.start()
        wait_for_metric(server, "kubemaas_num_requests_waiting", lambda v: v == 1)
        refused = httpx.post(f"{server.url}/v1/completions", json=completion(max_tokens=2),
                             timeout=30)
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        error = refused.json()["error"]
        assert error["code"] == "overloaded" and "queue is full" in error["message"]
        leave.set()  # the long stream's client leaves: the waiting request runs
        running.join(120)
        waiter.join(120)
        assert waiting_result[0].status_code == 200
        assert waiting_result[0].json()["usage"]["completion_tokens"] == 2
    finally:
        server.stop()


def test_abandoned_streams_are_cancelled_and_free_their_slots(module_tmp, long_dir):
    server = RuntimeServer(serve_args(long_dir, "--max-num-seqs", "4"), module_tmp).start()
    try:
        abandoned = 12
        for i in range(abandoned):  # each read up to its first token, then the client leaves
            with httpx.stream("POST", f"{server.url}/v1/completions", timeout=120,
                              json=completion(prompt=f"hello {i}", stream=True)) as response:
                next(response.iter_lines())
        answer = httpx.post(f"{server.url}/v1/completions", json=completion(max_tokens=4),
                            timeout=120)
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 4
        wait_for_metric(server, "kubemaas_num_requests_running", lambda v: v == 0)
        generated = server.metric("kubemaas_generation_tokens_total", LABELS)
        # Run to the end they would have made 12 x 8000 tokens; even the unread-chunk cap
        # (engine.MAX_UNREAD_CHUNKS) would have let each make 1024.
        assert generated - 4 < abandoned * 1024 / 2, generated
        assert server.metric("kubemaas_inflight_requests", LABELS) == 0
        assert server.metric("kubemaas_kv_cache_usage_ratio", LABELS) == 0
    finally:
        server.stop()


def test_sigterm_drains_running_streams(module_tmp, long_dir):
    server = RuntimeServer(serve_args(long_dir), module_tmp).start()
    try:
        lines: list[str] = []
        first = threading.Event()
        reader = threading.Thread(target=read_stream, args=(
            server.url, completion(max_tokens=300, stream=True), lines, first), daemon=True)
        reader.start()
        assert first.wait(60)
        server.terminate()
        reader.join(120)
        assert lines[-1] == "data: [DONE]"
        last = json.loads(lines[-2][6:])
        assert last["choices"][0]["finish_reason"] == "length"
        assert server.process.wait(60) == 0, server.logs()
    finally:
        server.stop()


def test_quantized_generation_reports_its_drift(module_tmp, long_dir):
    server = RuntimeServer(serve_args(long_dir, "--quantization", "int8-weight-only",
                                      "--max-drift", "0.2"), module_tmp).start()
    try:
        parameters = httpx.get(f"{server.url}/v2/models/tiny").json()["parameters"]
        assert parameters["quantization"] == "int8-weight-only"
        assert 0 <= parameters["quantization_drift"] <= 0.2
        assert 0.99 < parameters["quantization_logit_cosine"] <= 1.0
        assert server.metric("kubemaas_quantization_drift", LABELS) == parameters[
            "quantization_drift"]
        answer = httpx.post(f"{server.url}/v1/completions", json=completion(max_tokens=5),
                            timeout=60)
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 5
    finally:
        server.stop()


def test_generation_drift_above_max_drift_refuses_to_start(tmp_path, long_dir):
    code, log, stderr = run_failing(
        serve_args(long_dir, "--quantization", "int4-weight-only", "--max-drift", "0.01"),
        tmp_path)
    assert code != 0, stderr
    assert log.startswith("QuantizationDriftExceeded: "), (log, stderr)
    assert "greedy next tokens" in log and "> 0.01" in log
