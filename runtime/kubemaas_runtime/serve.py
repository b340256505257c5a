"""`kubemaas-runtime serve`: threads and device, then uvicorn; the model loads in the
background (liveness answers meanwhile), SIGTERM drains, a failed load exits non-zero with a
one-line reason in the termination log."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from typing import TYPE_CHECKING, NoReturn

import uvicorn

from kubemaas_runtime.config import ServeConfig
from kubemaas_runtime.errors import ModelLoadFailed, Overloaded
from kubemaas_runtime.http_limits import bounded_protocol
from kubemaas_runtime.termination import write_termination_log

if TYPE_CHECKING:
    from kubemaas_runtime.generation.model import GenerativeBase

log = logging.getLogger("kubemaas_runtime")
QUEUE_REJECT_MARGIN_S = 1.0
EXIT_BACKSTOP_MARGIN_S = 30.0  # after the drain time, a failed server exits regardless


class DrainingServer(uvicorn.Server):
    """uvicorn that turns readiness off at the first SIGTERM and, with `unready_delay_seconds`, keeps
    serving that long before it closes its socket and waits for in-flight requests."""

    def __init__(self, config: uvicorn.Config, state, drain_seconds: float) -> None:
        super().__init__(config)
        self._state = state
        self._drain_seconds = drain_seconds
        self._draining_since_signal = False

    def handle_exit(self, sig, frame) -> None:
        self._state.draining = True
        if self._drain_seconds > 0 and not self._draining_since_signal and not self.should_exit:
            self._draining_since_signal = True
            loop = asyncio.get_event_loop()
            loop.call_soon_threadsafe(
                loop.call_later, self._drain_seconds, super().handle_exit, sig, frame)
            return
        super().handle_exit(sig, frame)

    async def shutdown(self, sockets=None) -> None:
        # Requests still queued when the grace period is about to end get a clear 503 rather
        # than a connection reset (uvicorn cancels what is left at the deadline).
        grace = self.config.timeout_graceful_shutdown
        loop = asyncio.get_running_loop()
        handle = loop.call_later(max(0.0, (grace or 0) - QUEUE_REJECT_MARGIN_S),
                                 self._reject_queued) if grace else None
        try:
            await super().shutdown(sockets)
        finally:
            if handle is not None:
                handle.cancel()

    def _reject_queued(self) -> None:
        batcher = self._state.batcher
        if batcher is not None:
            failed = batcher.fail_waiting(Overloaded("server is shutting down; retry elsewhere"))
            if failed:
                log.warning("shutting down: %d queued requests answered 503", failed)

    @contextlib.contextmanager
    def capture_signals(self):
        """uvicorn re-raises the signal after shutting down; a drained exit is a clean one."""
        with super().capture_signals():
            yield
            captured = getattr(self, "_captured_signals", None)
            if isinstance(captured, list):
                captured.clear()


def serve(config: ServeConfig) -> int:
    logging.basicConfig(level=config.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        state = _build_state(config)
    except ModelLoadFailed as exc:
        write_termination_log(config.termination_log, exc.termination_line())
        return 1
    from kubemaas_runtime.server import create_app

    app = create_app(state)
    uv_config = uvicorn.Config(
        app, host=config.host, port=config.port, loop="uvloop",
        http=bounded_protocol(config.max_header_bytes, config.body_timeout_seconds),
        lifespan="on", access_log=False, log_level=config.log_level,
        limit_concurrency=config.max_connections,
        timeout_graceful_shutdown=config.drain_seconds or None)  # type: ignore[arg-type]  # uvicorn waits on a float fine
    server = DrainingServer(uv_config, state, config.unready_delay_seconds)

    def request_exit() -> None:
        server.should_exit = True
        if state.fatal_error is not None or state.load_error is not None:
            _exit_backstop(config, state)

    state.request_exit = request_exit
    server.run()
    failure = state.fatal_error or state.load_error
    if failure is not None:
        _exit_failed(config, failure)
    if not server.started:
        return 1
    return 0


def _exit_backstop(config: ServeConfig, state) -> None:
    """The process must end (failed load or device): if uvicorn's shutdown hangs (a dead
    engine's in-flight request, a stuck lifespan), exit non-zero anyway once the drain time
    and a margin have passed, so Kubernetes restarts the container."""
    def backstop() -> None:
        time.sleep((config.drain_seconds or 0) + EXIT_BACKSTOP_MARGIN_S)
        line = state.fatal_error or state.load_error or "the server failed to stop"
        log.error("shutdown did not finish in time; exiting: %s", line)
        _exit_failed(config, line)

    threading.Thread(target=backstop, name="exit-backstop", daemon=True).start()


def _exit_failed(config: ServeConfig, line: str) -> NoReturn:
    """Write the reason and end the process 1 now, without joining threads: the model thread
    may be stuck in a failed device, and a failed vLLM start leaves threads that never end."""
    write_termination_log(config.termination_log, line)
    logging.shutdown()
    os._exit(1)


def _build_state(config: ServeConfig):
    import torch

    from kubemaas_runtime.auth import read_token_file
    from kubemaas_runtime.device import available_cpus, resolve_device
    from kubemaas_runtime.metrics import create_metrics
    from kubemaas_runtime.models.base import Model, ModelOptions
    from kubemaas_runtime.models.registry import create_model
    from kubemaas_runtime.server import ServingState

    threads = available_cpus()
    torch.set_num_threads(threads)
    device = resolve_device(config.device)
    log.info("serving %s on %s with %d CPU threads", config.model_uri, device, threads)
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    choice = _choose_engine(config, gpus)
    log.info("engine %s (%s), tensor parallel size %d", choice.engine, choice.reason,
             choice.tensor_parallel_size)
    options = ModelOptions(
        path=config.model_path, name=config.name, variant=config.variant, task=config.task,
        architecture=config.architecture, quantization=config.quantization, device=device,
        max_batch_size=config.max_batch_size, max_drift=config.max_drift,
        max_model_len=config.max_model_len, max_num_seqs=config.max_num_seqs,
        kv_cache_tokens=config.kv_cache_tokens, kv_cache_memory=config.kv_cache_memory,
        max_num_batched_tokens=config.max_num_batched_tokens, max_queue=config.max_queue,
        compile=config.compile,
        adapters=adapter_options(config))
    if config.pipeline_parallel_size > 1 and choice.engine != "vllm":
        raise ModelLoadFailed(f"--pipeline-parallel-size {config.pipeline_parallel_size} splits the "
                              f"model over nodes, which only vLLM does ({choice.reason}): serve a "
                              "transformers model with --engine vllm from the kubemaas-runtime-vllm image")
    model: Model | GenerativeBase
    if choice.engine == "vllm":
        from kubemaas_runtime.generation.vllm_engine import VllmGenerativeModel, VllmSettings

        model = VllmGenerativeModel(options, VllmSettings(
            tensor_parallel_size=choice.tensor_parallel_size, max_model_len=config.max_model_len,
            pipeline_parallel_size=config.pipeline_parallel_size,
            distributed_executor_backend=config.distributed_executor_backend,
            max_num_seqs=config.max_num_seqs, max_queue=config.max_queue,
            kv_cache_tokens=config.kv_cache_tokens))
    else:
        model = create_model(config.format, options)
    metrics = create_metrics().bind(config.name, config.variant)
    metrics.record_engine(choice.engine, choice.tensor_parallel_size)
    token = read_token_file(config.auth_token_file) if config.auth_token_file else None
    return ServingState(config, model, metrics, auth_token=token, engine=choice)


def _choose_engine(config: ServeConfig, gpus: int):
    """vLLM is probed (imported: seconds) only where it could be chosen."""
    from kubemaas_runtime.engine_choice import (
        ModelFacts,
        choose_engine,
        model_architectures,
        probe_vllm,
    )

    facts = ModelFacts(config.task, config.format,
                       model_architectures(config.model_path)
                       if config.format == "transformers" else ())
    could_be_vllm = (config.engine == "vllm" or (
        config.engine == "auto" and config.task == "text-generation"
        and config.format == "transformers"))
    return choose_engine(config.engine, config.tensor_parallel_size, gpus, facts,
                         probe_vllm() if could_be_vllm else None)


def adapter_options(config: ServeConfig):
    """The LoRA flags as one object (None when adapters are off: --max-loras 0)."""
    if not config.max_loras:
        return None
    from kubemaas_runtime.generation.adapter_sync import AdapterOptions, parse_static_adapters

    return AdapterOptions(max_loras=config.max_loras, max_lora_rank=config.max_lora_rank,
                          static=parse_static_adapters(config.adapters or ""),
                          config_file=config.adapters_config, adapter_dir=config.adapter_dir)
