"""Choosing the next token: greedy (temperature 0, exactly `generate(do_sample=False)`'s
argmax) or sampling with temperature and nucleus (top_p), seeded per request."""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    # The optional features below are honoured only by an engine that lists their name in
    # `Engine.features` (engine_api.FEATURES); the front refuses them (400) otherwise.
    top_k: int = 0  # 0: off ("top_k")
    presence_penalty: float = 0.0  # OpenAI's meaning, [-2, 2] ("penalties")
    frequency_penalty: float = 0.0  # ("penalties")
    logprobs: int | None = None  # None: off; k >= 0: the chosen token's and the top k ("logprobs")
    json_schema: str | None = None  # a JSON schema as text, for response_format ("json_schema")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class Sampler:
    """One per sequence: holds its random generator so a seed gives the same text again."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self.generator: torch.Generator | None = None
        if not params.greedy:
            self.generator = torch.Generator()
            if params.seed is not None:
                self.generator.manual_seed(params.seed)
            else:
                self.generator.seed()

    def __call__(self, logits: torch.Tensor) -> int:
        """`logits`: the [vocab] scores of the last position (any float dtype)."""
        logits = logits.float()
        if self.params.greedy:
            return int(logits.argmax())
        probs = torch.softmax(logits / self.params.temperature, dim=-1)
        if self.params.top_p < 1.0:
            probs = nucleus(probs, self.params.top_p)
        return int(torch.multinomial(probs.cpu(), 1, generator=self.generator))


def nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the most likely tokens whose mass reaches `top_p` (at least one), renormalised."""
    ordered, order = probs.sort(descending=True)
    before = ordered.cumsum(-1) - ordered  # mass of the tokens ranked above each one
    ordered = ordered.masked_fill(before >= top_p, 0.0)
    kept = torch.zeros_like(probs).scatter(-1, order, ordered)
    return kept / kept.sum()
