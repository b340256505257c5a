"""`--task text-generation` in the runtime's model contract: load (causal LM, quantization,
the generation accuracy gate), warm up, and run the engine. Requests arrive through the
OpenAI and v2 generate routes (routes.py), never through /infer."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch

from kubemaas_runtime.errors import InvalidInput, ModelLoadFailed, QuantizationDriftExceeded
from kubemaas_runtime.gate import PROBE_TEXTS
from kubemaas_runtime.generation.causal_lm import CausalLM, load_causal_lm
from kubemaas_runtime.generation.engine import GenerationEngine
from kubemaas_runtime.generation.kv_cache import (
    DEFAULT_BLOCK_SIZE,
    kv_bytes_per_token,
    use_paged_attention,
)
from kubemaas_runtime.generation.scheduler import Scheduler
from kubemaas_runtime.models.base import Model, Signature, TensorSpec
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


class GenerativeModel(Model):
    platform = "transformers"

    def __init__(self, options, format: str) -> None:
        super().__init__(options)
        self.format = format
        self.lm: CausalLM | None = None
        self.engine: GenerationEngine | None = None
        self.metrics = None  # BoundMetrics, set by the routes before loading
        self.max_model_len = 0
        self.kv_cache_tokens = 0
        self.kv_bytes_per_token = 0
        self.logit_cosine: float | None = None
        self._probes: GenerationProbes | None = None
        self.adapters: Any = None  # AdapterRegistry when --max-loras > 0 (adapters.py)
        self.signature = Signature((TensorSpec("text_input", "BYTES", (1,)),),
                                   (TensorSpec("text_output", "BYTES", (1,)),))

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
        self.engine = GenerationEngine(
            lm, Scheduler(max_num_seqs=limits.max_num_seqs, kv_cache_tokens=self.kv_cache_tokens,
                          max_queue=limits.max_queue, block_size=DEFAULT_BLOCK_SIZE,
                          max_num_batched_tokens=limits.max_num_batched_tokens),
            max_model_len=self.max_model_len, metrics=self.metrics)
        if limits.adapters is not None:
            self._enable_adapters(lm, limits.adapters)
        self.ready = True

    def _enable_adapters(self, lm: CausalLM, options) -> None:
        """peft LoRA on this engine; adapters load once the engine runs (check_accuracy)."""
        from kubemaas_runtime.generation.adapters import AdapterRegistry, PeftAdapters

        if self.options.quantization not in ("none", "fp16", "bf16"):
            raise ModelLoadFailed(f"LoRA adapters (--max-loras) need quantization none, fp16 or "
                                  f"bf16, not {self.options.quantization}")
        backend = PeftAdapters(lm.model, max_rank=options.max_lora_rank,
                               run=self.engine.call_between_steps)
        backend.in_use = self.engine.adapter_in_use
        self.engine.lora = backend
        self.adapters = AdapterRegistry(
            backend, self.name, max_loras=options.max_loras,
            metrics=self.metrics.metrics if self.metrics is not None else None,
            variant=self.options.variant)
        self.engine.lora_registry = self.adapters

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
        """Token ids a prompt may hold are in [0, vocab_size) (the routes check them)."""
        return int(self.lm.model.config.vocab_size)

    def warmup(self) -> None:
        prompt = self.lm.encode("warm up")[: self.max_model_len - 2] or [0]
        self.lm.model(input_ids=torch.tensor([prompt], device=self.device))

    def check_accuracy(self) -> None:
        """The gate for generation (docs/quantization.md), then the engine starts."""
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
        self.engine.start()
        if self.adapters is not None:
            start_adapters(self.adapters, self.options.adapters)

    def predict(self, batch):
        raise InvalidInput(self._not_infer())

    def validate(self, request):
        raise InvalidInput(self._not_infer())

    def _not_infer(self) -> str:
        return (f"model '{self.name}' generates text: use /v1/chat/completions, /v1/completions "
                f"or /v2/models/{self.name}/generate")

    def metadata(self) -> dict[str, Any]:
        doc = super().metadata()
        doc["parameters"].update({"max_model_len": self.max_model_len,
                                  "max_num_seqs": self.options.max_num_seqs,
                                  "kv_cache_tokens": self.kv_cache_tokens,
                                  "kv_cache_bytes": self.kv_cache_tokens
                                  * self.kv_bytes_per_token,
                                  "kv_cache_block_size": DEFAULT_BLOCK_SIZE,
                                  "max_num_batched_tokens":
                                      self.options.max_num_batched_tokens,
                                  "format": self.format})
        doc["parameters"].pop("max_batch_size", None)
        if self.logit_cosine is not None:
            doc["parameters"]["quantization_logit_cosine"] = self.logit_cosine
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


def create_generative_model(options, format: str) -> Model:
    if format not in ("transformers", "gguf"):
        raise ModelLoadFailed(f"text-generation needs --format transformers or gguf, not {format}")
    return GenerativeModel(options, format)
