"""`--engine vllm` when vLLM's engine core fails: the runtime process must end non-zero (so
Kubernetes restarts the container), never stay up hung.

- At start: an engine core that cannot start (VLLM_CPU_KVCACHE_SPACE of 100000 GiB: vLLM's
  worker refuses it against the node's free memory before allocating) ends the process non-zero, with the reason
  in its log and termination log.
- Later: the engine core process killed (SIGKILL, by pid) while a request is in flight: that
  request gets an error (5xx, or the connection ends), never a hang, and the process exits
  non-zero with EngineDead in its termination log.

Real server processes with the vLLM venv on SmolLM2, as tests/runtime/test_generation_vllm.py
(whose fixtures these are). The deadlines are failure bounds for a hang, not timings."""

from __future__ import annotations

import concurrent.futures
import signal
import time

import httpx
import psutil

from tests.runtime.conftest import RuntimeServer, runtime_env
from tests.runtime.test_generation_vllm import VLLM_ENV, smollm2_dir, vllm_python

__all__ = ["smollm2_dir", "vllm_python"]  # the fixtures, imported for this module
EXIT_BOUND_S = 120.0  # a server that has not exited by then hangs
START_BOUND_S = 900.0  # vLLM takes minutes to start on two shared cores


def serve_args(smollm2_dir, *extra: str) -> list[str]:
    return ["--model-uri", f"file://{smollm2_dir}", "--format", "transformers", "--task",
            "text-generation", "--engine", "vllm", "--name", "smollm2", "--max-model-len",
            "2048", "--max-num-seqs", "4", "--max-queue", "4", *extra]


def launch(args: list[str], workdir, vllm_python, **env: str) -> RuntimeServer:
    return RuntimeServer(args, workdir, env=runtime_env(**{**VLLM_ENV, **env}),
                         command=[str(vllm_python), "-m", "kubemaas_runtime", "serve"]).launch()


def wait_exit(server: RuntimeServer, bound: float) -> int | None:
    try:
        return server.process.wait(bound)
    except Exception:  # noqa: BLE001 - TimeoutExpired: the server hangs
        return None


def engine_cores(pid: int) -> list[psutil.Process]:
    found = []
    for child in psutil.Process(pid).children(recursive=True):
        try:
            title = " ".join(child.cmdline()) + " " + child.name()
        except psutil.Error:
            continue
        if "EngineCore" in title:
            found.append(child)
    return found


def test_engine_core_that_cannot_start_ends_the_process(tmp_path, vllm_python, smollm2_dir):
    server = launch(serve_args(smollm2_dir), tmp_path, vllm_python,
                    VLLM_CPU_KVCACHE_SPACE="100000")
    try:
        code = wait_exit(server, START_BOUND_S)
        assert code is not None, f"the server did not exit:\n{server.logs()[-6000:]}"
        logs = server.logs()
        assert code != 0, logs[-6000:]
        assert "model failed to load" in logs and "vLLM cannot serve" in logs, logs[-6000:]
        assert "Available memory" in logs and "requested memory for kv" in logs, logs[-6000:]
        line = server.termination_log.read_text()
        assert "vLLM cannot serve" in line, line
    finally:
        server.stop(timeout=30)
        if server.process.poll() is None:
            server.process.kill()


def test_engine_core_killed_ends_requests_and_process(tmp_path, vllm_python, smollm2_dir):
    server = launch(serve_args(smollm2_dir), tmp_path, vllm_python)
    pool = concurrent.futures.ThreadPoolExecutor(1)
    try:
        server.start(timeout=START_BOUND_S)
        cores = engine_cores(server.process.pid)
        assert cores, "no EngineCore child process found"

        def long_request():
            try:
                return httpx.post(f"{server.url}/v1/completions", timeout=EXIT_BOUND_S, json={
                    "model": "smollm2", "prompt": "Once upon a time", "max_tokens": 1900,
                    "ignore_eos": True})
            except httpx.TransportError as exc:
                return exc

        in_flight = pool.submit(long_request)
        deadline = time.monotonic() + 60
        while server.metric("kubemaas_num_requests_running") < 1:
            assert time.monotonic() < deadline, "the request never started running"
            assert not in_flight.done(), in_flight.result()
            time.sleep(0.2)
        for core in cores:
            core.send_signal(signal.SIGKILL)
        answer = in_flight.result(EXIT_BOUND_S)  # raises TimeoutError on a hang
        if isinstance(answer, httpx.Response):
            assert answer.status_code >= 500, (answer.status_code, answer.text)
            assert answer.text, "an error without a message"
        code = wait_exit(server, EXIT_BOUND_S)
        assert code is not None, f"the server still runs with a dead engine:\n{server.logs()}"
        assert code != 0, server.logs()[-6000:]
        line = server.termination_log.read_text()
        assert "EngineDead" in line, (line, server.logs()[-6000:])
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        server.stop(timeout=30)
        if server.process.poll() is None:
            server.process.kill()
