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
from kubemaas_runtime.generation.rowwise import use_rowwise_attention
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
        self.logit_cosine: float | None = None
        self._probes: GenerationProbes | None = None
        self.signature = Signature((TensorSpec("text_input", "BYTES", (1,)),),
                                   (TensorSpec("text_output", "BYTES", (1,)),))

    def load(self) -> None:
        lm = load_causal_lm(self.options.path, self.format, self.device)
        limits = self.options
        self.max_model_len = min(limits.max_model_len or lm.context_length, lm.context_length)
        if limits.max_model_len and limits.max_model_len > lm.context_length:
            log.warning("--max-model-len %d exceeds the model's %d positions: using %d",
                        limits.max_model_len, lm.context_length, lm.context_length)
        self.kv_cache_tokens = limits.kv_cache_tokens or limits.max_num_seqs * self.max_model_len
        if self.kv_cache_tokens < self.max_model_len:
            log.warning("--kv-cache-tokens %d is below max-model-len %d: a sequence is bounded "
                        "by the budget", self.kv_cache_tokens, self.max_model_len)
        lm.model = self._quantize(lm)
        use_rowwise_attention(lm.model)
        self.lm = lm
        self.engine = GenerationEngine(
            lm, Scheduler(max_num_seqs=limits.max_num_seqs, kv_cache_tokens=self.kv_cache_tokens,
                          max_queue=limits.max_queue),
            max_model_len=self.max_model_len, metrics=self.metrics)
        self.ready = True

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
                                  "format": self.format})
        doc["parameters"].pop("max_batch_size", None)
        if self.logit_cosine is not None:
            doc["parameters"]["quantization_logit_cosine"] = self.logit_cosine
        return doc


def create_generative_model(options, format: str) -> Model:
    if format not in ("transformers", "gguf"):
        raise ModelLoadFailed(f"text-generation needs --format transformers or gguf, not {format}")
    return GenerativeModel(options, format)
