"""`--engine vllm`: vLLM's async engine (`vllm.v1.engine.async_llm.AsyncLLM`) in the runtime's
own process, behind the project's front (routes, admission, auth, errors, metrics).

The front tokenizes (the same `CausalLM.encode_chat` / `encode` as the builtin engine, from the
model directory's tokenizer and chat template) and hands vLLM prompt token ids; vLLM schedules,
runs and detokenizes. Each request is one asyncio task that iterates `AsyncLLM.generate` with
`RequestOutputKind.DELTA` and turns every output into a `Chunk`; cancelling the task aborts the
request inside vLLM (its `generate` does that on `CancelledError`), which frees its slot and KV
blocks. vLLM's engine core runs in a child process it starts itself (and, with
`--tensor-parallel-size` above 1, one worker process per rank).

vLLM is imported only here and only when this engine is chosen: the project's own venv has no
vLLM (it pins its own torch); its venv is hack/vllm-venv, its image `kubemaas-runtime-vllm`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from kubemaas_runtime.config import ServeConfig
from kubemaas_runtime.errors import (
    DeviceLost,
    ModelLoadFailed,
    ModelNotReady,
    Overloaded,
)
from kubemaas_runtime.generation.causal_lm import CausalLM
from kubemaas_runtime.generation.engine_api import Chunk
from kubemaas_runtime.generation.model import GenerativeBase
from kubemaas_runtime.generation.sampling import SamplingParams

log = logging.getLogger("kubemaas_runtime")
WATCHDOG_INTERVAL_S = 0.5  # how often the engine core's liveness is checked
# vLLM's dtype for the variants it can serve as they are; the rest are refused at start.
# "none" serves the weights as stored (vLLM's "auto" would turn fp32 weights into bf16).
VLLM_DTYPES = {"none": "auto", "fp16": "float16", "bf16": "bfloat16"}


def vllm_dtype(quantization: str, config: dict) -> str:
    if quantization != "none":
        return VLLM_DTYPES[quantization]
    stored = config.get("torch_dtype") or config.get("dtype")
    return "float32" if stored == "float32" else "auto"


@dataclasses.dataclass(frozen=True)
class VllmSettings:
    """What the vLLM engine takes from the serve configuration."""

    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1  # nodes, one stage each (resources.gpu.nodes)
    distributed_executor_backend: str | None = None  # ray across nodes; None: vLLM's choice
    max_model_len: int | None = None
    max_num_seqs: int = ServeConfig.max_num_seqs
    max_queue: int = ServeConfig.max_queue
    kv_cache_tokens: int | None = None


def default_cpu_environment(ranks: int) -> None:
    """vLLM's CPU backend binds its OpenMP threads to cores, one core list per tensor-parallel
    rank ("0,1|2,3"); its default (`auto`) fails in a container whose CPU set is a slice of the
    node's, so split the cores this process may use between the ranks. Set only where the
    operator or the user did not."""
    if "VLLM_CPU_OMP_THREADS_BIND" in os.environ or not hasattr(os, "sched_getaffinity"):
        return
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < ranks:
        raise ModelLoadFailed(f"--tensor-parallel-size {ranks} on CPU needs a core per rank; "
                              f"this process may use {len(cores)}")
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = omp_binding(cores, ranks)


def omp_binding(cores: list[int], ranks: int) -> str:
    """[0, 1, 2, 3], 2 -> "0,1|2,3": contiguous, as even as the cores allow."""
    size, extra = divmod(len(cores), ranks)
    groups, start = [], 0
    for rank in range(ranks):
        end = start + size + (1 if rank < extra else 0)
        groups.append(",".join(str(c) for c in cores[start:end]))
        start = end
    return "|".join(groups)


class EngineDead(DeviceLost):
    """vLLM's engine core died (a worker failed): nothing more can be served, so readiness
    turns false and the process exits with this line in the termination log."""

    reason = "EngineDead"


class VllmStream:
    """One request's chunks, fed by its task; `cancel()` aborts it inside vLLM."""

    def __init__(self, engine: VllmEngine, prompt_tokens: int) -> None:
        self._engine = engine
        self.prompt_tokens = prompt_tokens
        self._queue: asyncio.Queue[Chunk] = asyncio.Queue()
        self.task: asyncio.Task | None = None
        self.done = False
        self.started = False  # its first output arrived (running, not waiting)
        self.adapter: str | None = None  # its LoRA adapter's name

    def put(self, chunk: Chunk) -> None:
        if chunk.finish_reason is not None:
            self.done = True
        self._queue.put_nowait(chunk)

    async def chunks(self) -> AsyncIterator[Chunk]:
        try:
            while True:
                chunk = await self._queue.get()
                yield chunk
                if chunk.finish_reason is not None:
                    return
        finally:
            if not self.done:
                self.cancel()

    def cancel(self) -> None:
        if self.task is not None and not self.task.done():
            self.task.cancel()

    def abort(self, reason: str) -> None:
        """The server is stopping: end the stream with `abort` now."""
        if not self.done:
            self.put(Chunk("", (), "abort", self.prompt_tokens, 0, reason))
        self.cancel()


class VllmEngine:
    """The `engine_api.Engine` over an `AsyncLLM`."""

    def __init__(self, llm: Any, settings: VllmSettings, metrics=None) -> None:
        self.llm = llm
        self.settings = settings
        self.metrics = metrics  # BoundMetrics or None
        self._streams: set[VllmStream] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._started = False
        self._stopping = False
        self.kv_cache_usage = 0.0  # the scheduler's, from vLLM's stats (UsageStats)
        self.on_fatal: Callable[[DeviceLost], None] | None = None  # the server's device_failed
        self.lora_requests: dict[str, Any] = {}  # adapter name -> vLLM LoRARequest (adapters.py)
        self.lora_registry: Any = None  # AdapterRegistry: the per-adapter gauges
        self.dead: EngineDead | None = None  # set once vLLM's engine core is found dead
        self._watchdog: threading.Thread | None = None

    @property
    def capacity(self) -> int:
        """Sequences vLLM may run plus those allowed to wait for a slot (--max-queue)."""
        return self.settings.max_num_seqs + self.settings.max_queue

    def start(self) -> None:
        """Mark the engine running and start the watchdog (the event loop is learnt at the
        first submit, or set beforehand on `_loop`)."""
        self._started = True
        self._watchdog = threading.Thread(target=self._watch, name="vllm-watchdog", daemon=True)
        self._watchdog.start()

    def _watch(self, interval: float = WATCHDOG_INTERVAL_S) -> None:
        """vLLM notices its engine core's death (its monitor thread sets `errored`) but tells
        nobody: with no request in flight, or with requests waiting on outputs that never
        come, the server would stay up and hang. Poll it; on death, fail every stream and
        report the death, which turns readiness off and ends the process."""
        while not self._stopping:
            if self.llm.errored:
                self._engine_died(EngineDead("vLLM's engine core died (its process exited); "
                                             "the server exits so the pod restarts"))
                return
            time.sleep(interval)

    def _engine_died(self, exc: EngineDead) -> None:
        """Once: fail the open streams (their requests get an error, not a hang) and tell the
        server. Any thread."""
        if self.dead is not None or self._stopping:
            return
        self.dead = exc
        log.error("vLLM engine: %s", exc)
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(self._fail_all, str(exc))
        if self.on_fatal is not None:
            self.on_fatal(exc)

    def _fail_all(self, reason: str) -> None:
        for stream in list(self._streams):
            if not stream.done:
                stream.put(Chunk("", (), "error", stream.prompt_tokens, 0, reason))
            stream.cancel()

    def stop(self, timeout: float = 10.0) -> None:
        """End every stream with `abort`, then shut vLLM's processes down. Any thread."""
        self._stopping = True
        loop = self._loop
        if loop is not None and not loop.is_closed():
            done = asyncio.run_coroutine_threadsafe(self._abort_all(), loop)
            try:
                done.result(timeout)
            except Exception:  # noqa: BLE001 - the loop may be stopping: shut down anyway
                log.warning("vLLM engine: could not end the open streams before shutdown")
        # vLLM's shutdown waits on its engine core; a dead one may never answer: bounded
        closing = threading.Thread(target=self.llm.shutdown, name="vllm-shutdown", daemon=True)
        closing.start()
        closing.join(timeout)
        if closing.is_alive():
            log.warning("vLLM engine: shutdown did not finish in %.0fs; exiting anyway", timeout)

    async def _abort_all(self) -> None:
        for stream in list(self._streams):
            stream.abort("the server is stopping")
        await asyncio.sleep(0)

    @property
    def features(self) -> frozenset[str]:
        return VLLM_FEATURES  # each mapped by to_vllm_params

    @property
    def alive(self) -> bool:
        return (self._started and not self._stopping and self.dead is None
                and not self.llm.errored)

    def submit(self, prompt_ids: list[int], params: SamplingParams,
               adapter: str | None = None) -> VllmStream:
        """Queue a sequence; call on the event loop."""
        if not self.alive:
            raise ModelNotReady("the vLLM engine is not running")
        if len(self._streams) >= self.capacity:
            raise Overloaded(f"{len(self._streams)} sequences are running or waiting (the "
                             f"limit is --max-num-seqs + --max-queue = {self.capacity}); "
                             f"retry later")
        self._loop = asyncio.get_running_loop()
        stream = VllmStream(self, len(prompt_ids))
        stream.adapter = adapter
        self._streams.add(stream)
        stream.task = self._loop.create_task(self._run(stream, list(prompt_ids), params))
        self._publish_gauges()
        return stream

    async def _run(self, stream: VllmStream, prompt_ids: list[int],
                   params: SamplingParams) -> None:
        from vllm.inputs import TokensPrompt

        metrics = self.metrics
        arrival = last = time.perf_counter()
        generated = 0
        try:
            lora = self.lora_requests.get(stream.adapter) if stream.adapter else None
            outputs = self.llm.generate(TokensPrompt(prompt_token_ids=prompt_ids),
                                        to_vllm_params(params), f"kubemaas-{secrets.token_hex(8)}",
                                        **({"lora_request": lora} if lora is not None else {}))
            async for output in outputs:
                completion = output.outputs[0]
                tokens = tuple(completion.token_ids)
                now = time.perf_counter()
                if metrics is not None and tokens:
                    if generated == 0:
                        metrics.prompt_tokens.inc(len(prompt_ids))
                        metrics.ttft.observe(now - arrival)
                        gaps = [0.0] * (len(tokens) - 1)
                    else:
                        gaps = [(now - last) / len(tokens)] * len(tokens)
                    for gap in gaps:
                        metrics.inter_token.observe(gap)
                    metrics.generation_tokens.inc(len(tokens))
                if not stream.started:
                    stream.started = True
                    self._publish_gauges()
                generated += len(tokens)
                last = now
                finish = completion.finish_reason if output.finished else None
                if finish is not None and finish not in ("stop", "length"):
                    stream.put(Chunk(completion.text, tokens, "abort", len(prompt_ids),
                                     generated, f"vLLM ended the request: {finish}"))
                    return
                stream.put(Chunk(completion.text, tokens, finish, len(prompt_ids), generated,
                                 logprobs=chunk_logprobs(tokens, completion.logprobs,
                                                         params.logprobs)))
                if finish is not None:
                    return
            if not stream.done:  # vLLM's generator ended without a finished output
                stream.put(Chunk("", (), "error", len(prompt_ids), generated,
                                 "vLLM ended the request without finishing it"))
        except asyncio.CancelledError:
            raise  # cancel(): vLLM's generate() aborted the request on its way out
        except Exception as exc:  # noqa: BLE001 - one request's failure, reported in its stream
            log.warning("vLLM request failed: %s: %s", type(exc).__name__, exc)
            reason = "abort" if self._stopping else "error"
            if self.llm.errored and not self._stopping:
                self._engine_died(EngineDead(f"vLLM's engine core died: "
                                             f"{type(exc).__name__}: {str(exc)[:300]}"))
            stream.put(Chunk("", (), reason, len(prompt_ids), generated,
                             f"{type(exc).__name__}: {exc}"))
        finally:
            self._streams.discard(stream)
            self._publish_gauges()

    def _publish_gauges(self) -> None:
        if self.metrics is None:
            return
        running = sum(1 for s in self._streams if s.started)
        self.metrics.running.set(running)
        self.metrics.waiting.set(len(self._streams) - running)
        self.metrics.kv_cache_usage.set(self.kv_cache_usage if self._streams else 0.0)
        if self.lora_registry is not None:
            self.lora_registry.publish(
                [s.adapter for s in self._streams if s.adapter and s.started],
                [s.adapter for s in self._streams if s.adapter and not s.started])


# The optional sampling features (engine_api.FEATURES) vLLM honours, each mapped below; `n` is
# the front's (n sequences), so it is not an engine feature.
VLLM_FEATURES = frozenset({"top_k", "penalties", "logprobs", "json_schema"})


def to_vllm_params(params: SamplingParams):
    """The front's parameters as vLLM's: each field the front accepted, nothing dropped.
    `json_schema` is vLLM's structured output (`StructuredOutputsParams(json=...)`, compiled
    by its grammar backend); `logprobs` k asks for the chosen token's and the top k."""
    from vllm import SamplingParams as VllmSamplingParams
    from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

    structured = (StructuredOutputsParams(json=params.json_schema)
                  if params.json_schema is not None else None)
    return VllmSamplingParams(
        n=1, max_tokens=params.max_tokens, temperature=params.temperature, top_p=params.top_p,
        top_k=params.top_k, presence_penalty=params.presence_penalty,
        frequency_penalty=params.frequency_penalty, logprobs=params.logprobs,
        seed=params.seed, stop=list(params.stop) or None, ignore_eos=params.ignore_eos,
        structured_outputs=structured, skip_special_tokens=True,
        output_kind=RequestOutputKind.DELTA)


def chunk_logprobs(tokens: tuple[int, ...], positions, top: int | None):
    """vLLM's logprobs of the new tokens (one {token id: Logprob} per position: the top k by
    rank plus the chosen token) as `Chunk.logprobs`: (chosen logprob, top k by rank)."""
    if top is None or positions is None:
        return None
    entries = []
    for token, position in zip(tokens, positions):
        position = position or {}
        chosen = position.get(token)
        ranked = sorted(((lp.rank, t, lp.logprob) for t, lp in position.items()
                         if lp.rank is not None and lp.rank <= top), key=lambda e: e[0])
        entries.append((float(chosen.logprob) if chosen is not None else float("nan"),
                        tuple((t, float(lp)) for _, t, lp in ranked)))
    return tuple(entries)


def _stat_logger_factory(engine_ref: list):
    """vLLM's scheduler stats (KV-cache usage) into the engine's gauge."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    class UsageStats(StatLoggerBase):
        def __init__(self, vllm_config, engine_index: int = 0) -> None:
            pass

        def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None,
                   engine_idx: int = 0) -> None:
            engine = engine_ref[0] if engine_ref else None
            if engine is not None and scheduler_stats is not None:
                engine.kv_cache_usage = float(scheduler_stats.kv_cache_usage)
                engine._publish_gauges()

        def log_engine_initialized(self) -> None:
            pass

    return UsageStats


class VllmGenerativeModel(GenerativeBase):
    """`--task text-generation` served by vLLM: a transformers directory (safetensors)."""

    platform = "vllm"

    def __init__(self, options, settings: VllmSettings) -> None:
        super().__init__(options, "transformers")
        self.settings = settings
        self.llm: Any = None  # vLLM's AsyncLLM; `lm` is the tokenizer side only
        self._engine_ref: list = []  # the stat logger's way to the engine, once it exists
        self.vllm_version = ""
        self.dtype = ""

    def load(self) -> None:
        path = Path(self.options.path)
        if not (path / "config.json").is_file():
            raise ModelLoadFailed(f"{path} is not a transformers directory (no config.json): "
                                  f"the vLLM engine serves transformers directories")
        if not any(path.glob("*.safetensors")):
            raise ModelLoadFailed(f"{path} has no .safetensors weights (pickled weights are "
                                  f"never loaded)")
        method = self.options.quantization
        if method not in VLLM_DTYPES:
            raise ModelLoadFailed(
                f"--quantization {method} is not supported by the vLLM engine (it serves "
                f"{', '.join(VLLM_DTYPES)}); use --engine builtin for {method}")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # serving never reaches for the hub
        if self.device.type == "cpu":
            default_cpu_environment(self.settings.tensor_parallel_size)
        import vllm
        from transformers import AutoTokenizer
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        self.vllm_version = vllm.__version__
        settings = self.settings
        import json

        config = json.loads((path / "config.json").read_text())
        args = AsyncEngineArgs(
            model=str(path), tokenizer=str(path), dtype=vllm_dtype(method, config),
            tensor_parallel_size=settings.tensor_parallel_size,
            pipeline_parallel_size=settings.pipeline_parallel_size,
            distributed_executor_backend=settings.distributed_executor_backend,
            max_model_len=settings.max_model_len, max_num_seqs=settings.max_num_seqs,
            trust_remote_code=False, disable_log_stats=True, enable_log_requests=False,
            kv_cache_memory_bytes=self._kv_cache_bytes(config), **self._lora_args())
        try:
            llm = AsyncLLM.from_engine_args(
                args, stat_loggers=[_stat_logger_factory(self._engine_ref)])
            tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True,
                                                      trust_remote_code=False)
        except Exception as exc:  # noqa: BLE001 - vLLM raises many kinds; all end the start
            raise ModelLoadFailed(f"vLLM cannot serve {path}: {type(exc).__name__}: "
                                  f"{str(exc)[:400]}") from None
        self.max_model_len = int(llm.model_config.max_model_len)
        self.dtype = str(llm.model_config.dtype).removeprefix("torch.")
        self.lm = CausalLM(None, tokenizer, eos_token_ids_of(llm, tokenizer),
                           self.max_model_len, "transformers")
        self.llm = llm
        self.quantization, self.quantization_backend = method, "vllm" if method != "none" else (
            "none")
        self.ready = True

    def _kv_cache_bytes(self, config: dict) -> int | None:
        """--kv-cache-tokens as vLLM's KV-cache bytes (None: vLLM sizes it)."""
        tokens = self.settings.kv_cache_tokens
        if tokens is None:
            return None
        layers = int(config["num_hidden_layers"])
        heads = int(config.get("num_key_value_heads") or config["num_attention_heads"])
        head_dim = int(config.get("head_dim") or config["hidden_size"] //
                       config["num_attention_heads"])
        width = {"fp16": 2, "bf16": 2}.get(self.options.quantization, 4)
        return tokens * layers * 2 * heads * head_dim * width

    def _lora_args(self) -> dict[str, Any]:
        """vLLM's LoRA switches (--max-loras > 0): as many slots in a batch as adapters."""
        options = self.options.adapters
        if options is None:
            return {}
        return {"enable_lora": True, "max_loras": options.max_loras,
                "max_lora_rank": options.max_lora_rank, "max_cpu_loras": options.max_loras}

    def start_engine(self, metrics, on_fatal: Callable[[DeviceLost], None]) -> VllmEngine:
        """Quantization is vLLM's dtype: there is no gate to run before it serves."""
        engine = VllmEngine(self.llm, self.settings, metrics=metrics)
        engine.on_fatal = on_fatal
        self._engine_ref.append(engine)
        options = self.options.adapters
        if options is not None:
            from kubemaas_runtime.generation.adapters import AdapterRegistry, VllmAdapters

            backend = VllmAdapters(engine, Path(self.options.path), max_rank=options.max_lora_rank)
            self.adapters = AdapterRegistry(
                backend, self.name, max_loras=options.max_loras,
                metrics=metrics.metrics if metrics is not None else None,
                variant=self.options.variant)
            engine.lora_registry = self.adapters
        engine.start()
        self.engine = engine
        if self.adapters is not None:
            from kubemaas_runtime.generation.model import start_adapters

            start_adapters(self.adapters, options)
        return engine

    @property
    def vocab_size(self) -> int:
        return int(self.llm.model_config.get_vocab_size())

    def metadata(self) -> dict[str, Any]:
        doc = super().metadata()
        doc["parameters"].update({
            "engine": "vllm", "vllm_version": self.vllm_version, "dtype": self.dtype,
            "tensor_parallel_size": self.settings.tensor_parallel_size})
        return doc


def eos_token_ids_of(llm, tokenizer) -> frozenset[int]:
    ids = set()
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None:
        ids.add(int(eos))
    config = getattr(llm.model_config, "hf_config", None)
    configured = getattr(config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(int(i) for i in configured)
    return frozenset(ids)
