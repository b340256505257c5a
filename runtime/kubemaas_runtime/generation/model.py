"""`--task text-generation`: what the generation app (routes.py) serves. `GenerativeBase` is the
contract both engines' models keep (load, warm up, gate, then `start_engine`, which returns the
running `engine_api.Engine`); it is not the tensor `Model`: there is no predict, no signature
check and no DynamicBatcher. `GenerativeModel` is the builtin engine's (causal LM, quantization,
the generation accuracy gate); vllm_engine.VllmGenerativeModel is vLLM's."""

from __future__ import annotations

import abc
import dataclasses
import logging
from collections.abc import Callable
from typing import Any

import torch

from kubemaas_runtime.errors import DeviceLost, ModelLoadFailed, QuantizationDriftExceeded
from kubemaas_runtime.gate import PROBE_TEXTS
from kubemaas_runtime.generation.causal_lm import CausalLM, load_causal_lm
from kubemaas_runtime.generation.engine import GenerationEngine
from kubemaas_runtime.generation.engine_api import Engine
from kubemaas_runtime.generation.kv_cache import (
    DEFAULT_BLOCK_SIZE,
    kv_bytes_per_token,
    use_paged_attention,
)
from kubemaas_runtime.generation.scheduler import Scheduler
from kubemaas_runtime.models.base import ModelOptions
from kubemaas_runtime.quantization import check_supported, quantize_module

log = logging.getLogger("kubemaas_runtime")


@dataclasses.dataclass(frozen=True)
class GenerationProbes:
    """Full-precision references on the probe prompts, taken before quantizing: the greedy
    next token at every prompt position, and the logits of each prompt's last position."""

    prompts: list[list[int]]
    next_tokens: list[torch.Tensor]
    last_logits: list[torch.Tensor]


def probe_outputs(model: torch.nn.Module, prompts: list[list[int]], device: torch.device
                  ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    next_tokens, last_logits = [], []
    with torch.inference_mode():
        for prompt in prompts:
            logits = model(input_ids=torch.tensor([prompt], device=device)).logits[0].float()
            next_tokens.append(logits.argmax(-1).cpu())
            last_logits.append(logits[-1].cpu())
    return next_tokens, last_logits


def generation_drift(probes: GenerationProbes, next_tokens, last_logits) -> tuple[float, float]:
    """(drift, min logit cosine): drift is the share of probe positions whose greedy next
    token changed; the cosine is over each prompt's last-position logits."""
    changed = sum(int((a != b).sum()) for a, b in zip(probes.next_tokens, next_tokens))
    positions = sum(len(t) for t in probes.next_tokens)
    cosine = min(float(torch.nn.functional.cosine_similarity(a, b, dim=0))
                 for a, b in zip(probes.last_logits, last_logits))
    return changed / positions, cosine


# What /v2/models/{name} shows as the inputs and outputs of a generative model (v2 generate).
TEXT_INPUTS = [{"name": "text_input", "datatype": "BYTES", "shape": [1]}]
TEXT_OUTPUTS = [{"name": "text_output", "datatype": "BYTES", "shape": [1]}]


class GenerativeBase(abc.ABC):
    """A text-generation model as the generation app sees it, whichever engine runs it:

    - `load()`, `warmup()`, `check_accuracy()` on the model thread, in that order, then
      `start_engine(metrics, on_fatal)`, which builds the engine with the server's metrics and
      the callback that ends the process when the engine dies, starts it and returns it;
    - `lm` (the tokenizer side: `encode`, `encode_chat`, `decode`), `max_model_len`,
      `vocab_size`, `metadata()`; `engine` once started."""

    generative = True  # server.create_app mounts the generation app for this model
    platform = "transformers"

    def __init__(self, options: ModelOptions, format: str) -> None:
        self.options = options
        self.name = options.name
        self.device = options.device
        self.format = format
        self.ready = False
        self.quantization = "none"  # what load() actually applied
        self.quantization_backend = "none"
        self.drift: float | None = None
        self.lm: CausalLM | None = None
        self.engine: Engine | None = None
        self.max_model_len = 0
        self.adapters: Any = None  # AdapterRegistry when --max-loras > 0 (adapters.py)

    @abc.abstractmethod
    def load(self) -> None: ...

    def warmup(self) -> None:
        pass

    def check_accuracy(self) -> None:
        pass

    @abc.abstractmethod
    def start_engine(self, metrics, on_fatal: Callable[[DeviceLost], None]) -> Engine: ...

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Token ids a prompt may hold are in [0, vocab_size) (the routes check them)."""

    def metadata(self) -> dict[str, Any]:
        options = self.options
        return {
            "name": self.name, "versions": ["1"], "platform": self.platform,
            "inputs": TEXT_INPUTS, "outputs": TEXT_OUTPUTS,
            "parameters": {
                "variant": options.variant, "quantization": self.quantization,
                "quantization_backend": self.quantization_backend,
                **({"quantization_drift": self.drift} if self.drift is not None else {}),
                **({"max_drift": options.max_drift} if options.max_drift is not None else {}),
                "device": str(self.device),
                **({"task": options.task} if options.task else {}),
                "max_model_len": self.max_model_len, "max_num_seqs": options.max_num_seqs,
                "format": self.format,
                # the optional sampling features (engine_api.FEATURES) the engine honours
                "sampling_features": sorted(self.engine.features) if self.engine else [],
            },
        }


class GenerativeModel(GenerativeBase):
    """The builtin engine's model: a causal LM (transformers or GGUF) on the runtime's torch."""

    def __init__(self, options: ModelOptions, format: str) -> None:
        super().__init__(options, format)
        self.kv_cache_tokens = 0
        self.kv_bytes_per_token = 0
        self.logit_cosine: float | None = None
        self._probes: GenerationProbes | None = None

    def load(self) -> None:
        lm = load_causal_lm(self.options.path, self.format, self.device)
        limits = self.options
        self.max_model_len = min(limits.max_model_len or lm.context_length, lm.context_length)
        if limits.max_model_len and limits.max_model_len > lm.context_length:
            log.warning("--max-model-len %d exceeds the model's %d positions: using %d",
                        limits.max_model_len, lm.context_length, lm.context_length)
        lm.model = self._quantize(lm)
        self.kv_cache_tokens = self._kv_cache_tokens(lm)
        if self.kv_cache_tokens < self.max_model_len:
            log.warning("the KV cache holds %d tokens, below max-model-len %d: a sequence is "
                        "bounded by the budget", self.kv_cache_tokens, self.max_model_len)
        use_paged_attention(lm.model)
        self.lm = lm
        self.ready = True

    def start_engine(self, metrics, on_fatal: Callable[[DeviceLost], None]) -> GenerationEngine:
        limits = self.options
        engine = GenerationEngine(
            self.lm, Scheduler(max_num_seqs=limits.max_num_seqs,
                               kv_cache_tokens=self.kv_cache_tokens, max_queue=limits.max_queue,
                               block_size=DEFAULT_BLOCK_SIZE,
                               max_num_batched_tokens=limits.max_num_batched_tokens),
            max_model_len=self.max_model_len, metrics=metrics)
        if limits.adapters is not None:  # after the gate: it measured the base model
            self._enable_adapters(engine, limits.adapters, metrics)
        if limits.compile == "decode":
            if limits.adapters is not None:
                log.warning("--compile decode is off with LoRA adapters (--max-loras): every "
                            "step runs eager")
            else:  # before start(), so before the server is ready: no request pays a compile
                engine.compile_decode()
        engine.start()
        self.engine = engine
        if self.adapters is not None:  # loading an adapter runs between the engine's steps
            start_adapters(self.adapters, limits.adapters)
        return engine

    def _enable_adapters(self, engine: GenerationEngine, options, metrics) -> None:
        """peft LoRA on this engine's model (adapters.py)."""
        from kubemaas_runtime.generation.adapters import AdapterRegistry, PeftAdapters

        if self.options.quantization not in ("none", "fp16", "bf16"):
            raise ModelLoadFailed(f"LoRA adapters (--max-loras) need quantization none, fp16 or "
                                  f"bf16, not {self.options.quantization}")
        backend = PeftAdapters(self.lm.model, max_rank=options.max_lora_rank,
                               run=engine.call_between_steps)
        backend.in_use = engine.adapter_in_use
        engine.lora = backend
        self.adapters = AdapterRegistry(
            backend, self.name, max_loras=options.max_loras,
            metrics=metrics.metrics if metrics is not None else None,
            variant=self.options.variant)
        engine.lora_registry = self.adapters

    def _kv_cache_tokens(self, lm: CausalLM) -> int:
        """The paged pool's size in tokens (whole blocks): --kv-cache-tokens and
        --kv-cache-memory (bytes), the smaller when both are set; else max-num-seqs x
        max-model-len, capped at half the device's free memory."""
        limits = self.options
        dtype = next((p.dtype for p in lm.model.parameters() if p.is_floating_point()),
                     torch.float32)
        self.kv_bytes_per_token = kv_bytes_per_token(lm.model.config, dtype)
        budgets = []
        if limits.kv_cache_tokens:
            budgets.append(limits.kv_cache_tokens)
        if limits.kv_cache_memory:
            budgets.append(limits.kv_cache_memory // self.kv_bytes_per_token)
        if not budgets:
            default = limits.max_num_seqs * self.max_model_len
            cap = free_memory(self.device) // 2 // self.kv_bytes_per_token
            if cap < default:
                log.warning("KV cache: %d tokens (max-num-seqs x max-model-len) would take "
                            "%d MiB; capped at half the free memory: %d tokens", default,
                            default * self.kv_bytes_per_token >> 20, cap)
            budgets.append(min(default, cap))
        tokens = max(min(budgets) // DEFAULT_BLOCK_SIZE, 1) * DEFAULT_BLOCK_SIZE
        log.info("KV cache: %d tokens in blocks of %d, %d MiB (%d bytes a token)", tokens,
                 DEFAULT_BLOCK_SIZE, tokens * self.kv_bytes_per_token >> 20,
                 self.kv_bytes_per_token)
        return tokens

    def _quantize(self, lm: CausalLM) -> torch.nn.Module:
        method = self.options.quantization
        if method != "none":
            check_supported(method, self.device)
            prompts = [lm.encode(text)[:64] for text in PROBE_TEXTS]
            self._probes = GenerationProbes(prompts, *probe_outputs(lm.model, prompts,
                                                                     self.device))
        result = quantize_module(lm.model, method, self.device)
        self.quantization, self.quantization_backend = method, result.backend
        return result.module

    @property
    def vocab_size(self) -> int:
        return int(self.lm.model.config.vocab_size)

    def warmup(self) -> None:
        prompt = self.lm.encode("warm up")[: self.max_model_len - 2] or [0]
        self.lm.model(input_ids=torch.tensor([prompt], device=self.device))

    def check_accuracy(self) -> None:
        """The gate for generation (docs/quantization.md)."""
        if self._probes is not None:
            self.drift, self.logit_cosine = generation_drift(
                self._probes, *probe_outputs(self.lm.model, self._probes.prompts, self.device))
            log.info("quantization %s: greedy next-token drift %.4f, min logit cosine %.6f",
                     self.quantization, self.drift, self.logit_cosine)
            bound = self.options.max_drift
            if bound is not None and self.drift > bound:
                raise QuantizationDriftExceeded(
                    f"{self.drift:.6g} > {bound:g} (share of greedy next tokens that changed on "
                    f"{sum(len(p) for p in self._probes.prompts)} probe positions; min logit "
                    f"cosine {self.logit_cosine:.6f})")
            self._probes = None

    def metadata(self) -> dict[str, Any]:
        doc = super().metadata()
        doc["parameters"].update({"kv_cache_tokens": self.kv_cache_tokens,
                                  "kv_cache_bytes": self.kv_cache_tokens
                                  * self.kv_bytes_per_token,
                                  "kv_cache_block_size": DEFAULT_BLOCK_SIZE,
                                  "max_num_batched_tokens":
                                      self.options.max_num_batched_tokens})
        if self.logit_cosine is not None:
            doc["parameters"]["quantization_logit_cosine"] = self.logit_cosine
        compiled = getattr(self.engine, "compiled", None)
        doc["parameters"]["compile"] = self.options.compile
        if compiled is not None:  # whether it still runs, and how often it did
            doc["parameters"]["compiled_decode"] = {
                "enabled": compiled.enabled, "buckets": list(compiled.buckets),
                "compile_seconds": round(compiled.compile_seconds, 1),
                "compiled_steps": compiled.compiled_steps, "eager_steps": compiled.eager_steps}
        return doc


def free_memory(device: torch.device) -> int:
    """Bytes free on the device: CUDA's own count, else the host's MemAvailable."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30  # unknown: assume a modest host


def start_adapters(registry, options):
    """Load the --adapters given at start (a refusal fails the start), then watch
    --adapters-config; returns the watcher (None without a config file)."""
    from kubemaas_runtime.errors import RuntimeServeError
    from kubemaas_runtime.generation.adapter_sync import AdapterConfigWatcher

    for name, path in options.static:
        try:
            registry.load(name, path)
        except RuntimeServeError as exc:
            param = getattr(exc, "param", None)
            raise ModelLoadFailed(f"adapter {name} ({path}): {exc.message}"
                                  + (f" (field {param})" if param else "")) from None
    if options.config_file is None:
        return None
    watcher = AdapterConfigWatcher(registry, options)
    watcher.start()
    return watcher


def create_generative_model(options, format: str) -> GenerativeModel:
    if format not in ("transformers", "gguf"):
        raise ModelLoadFailed(f"text-generation needs --format transformers or gguf, not {format}")
    return GenerativeModel(options, format)
