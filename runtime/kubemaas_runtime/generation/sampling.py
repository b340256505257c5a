"""Choosing the next tokens of a step, for all its rows at once, on the device.

Per step the engine hands `StepSampler.sample` the logits of every row that ends there
(`[rows, vocab]`) and each row's `SequenceSampling`; the sampling parameters become `[rows]`
tensors and the whole step is sampled in a few batched ops, with one `.tolist()` at the end:

- **penalties** (OpenAI's definition): `logit - presence * [count > 0] - frequency * count`,
  where `count` is how often the token was generated so far in this sequence (the prompt does not
  count, as in vLLM); the counts live in one `[max rows, vocab]` tensor, a row per penalised
  sequence, updated by one `index_put_` per step;
- **greedy** rows (temperature 0) take the argmax: exactly `generate(do_sample=False)`'s token
  (of the penalised logits when penalties are set);
- **sampled** rows: logits / temperature, then top-k (the k best), then top-p (nucleus: the best
  tokens whose renormalised mass reaches top_p, at least one), then a draw by the exponential
  race (`argmax(p / E)`, E ~ Exp(1) per token, which picks token i with probability p_i). A
  seeded request draws its E from its own generator, so a seed gives the same text again
  whatever else shares the steps; unseeded rows share one batched draw;
- **logprobs** (raw: log_softmax of the model's logits, before penalties and temperature, as
  vLLM reports them by default): the chosen token's and the top k's, for the rows that ask.

A step where every row is plain greedy (no penalties, no logprobs) is one argmax and one
`.tolist()`.
"""

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

    @property
    def penalised(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


# (logprob of the chosen token, ((token id, logprob), ...) of the top k)
TokenLogprobs = tuple[float, tuple[tuple[int, float], ...]]


@dataclasses.dataclass(eq=False)
class SequenceSampling:
    """One sequence's sampling state: its parameters, its generator when seeded, and its row
    of the step sampler's token counts when penalised."""

    params: SamplingParams
    generator: torch.Generator | None = None
    slot: int | None = None

    @property
    def plain(self) -> bool:
        return self.params.greedy and self.slot is None and self.params.logprobs is None


class StepSampler:
    """Samples all the rows of a step at once (see the module doc)."""

    def __init__(self, device: torch.device, max_rows: int) -> None:
        self.device = device
        self.generator = torch.Generator(device=device)  # unseeded rows share it
        self.generator.seed()
        self._free_slots = list(range(max_rows - 1, -1, -1))
        self._counts: torch.Tensor | None = None  # [max_rows, vocab], allocated at first use
        self._max_rows = max_rows

    def attach(self, params: SamplingParams) -> SequenceSampling:
        state = SequenceSampling(params)
        if not params.greedy and params.seed is not None:
            state.generator = torch.Generator(device=self.device)
            state.generator.manual_seed(params.seed)
        if params.penalised:
            state.slot = self._free_slots.pop()
        return state

    def release(self, state: SequenceSampling) -> None:
        if state.slot is not None:
            if self._counts is not None:
                self._counts[state.slot].zero_()
            self._free_slots.append(state.slot)
            state.slot = None

    def counts(self, vocab: int) -> torch.Tensor:
        if self._counts is None or self._counts.shape[1] != vocab:
            self._counts = torch.zeros(self._max_rows, vocab, device=self.device)
        return self._counts

    def sample(self, logits: torch.Tensor, rows: list[SequenceSampling]
               ) -> tuple[list[int], list[TokenLogprobs | None] | None]:
        """`logits`: [rows, vocab] (any float dtype). The rows' next tokens, and their logprobs
        (None for a row that did not ask; None for the whole step when none did)."""
        if all(row.plain for row in rows):
            return logits.argmax(-1).tolist(), None
        device, vocab = logits.device, logits.shape[-1]
        scores = logits.float()
        penalised = [i for i, row in enumerate(rows) if row.slot is not None]
        if penalised:
            at = torch.tensor(penalised, device=device)
            slots = torch.tensor([rows[i].slot for i in penalised], device=device)
            count = self.counts(vocab)[slots]
            presence = torch.tensor([rows[i].params.presence_penalty for i in penalised],
                                    device=device)[:, None]
            frequency = torch.tensor([rows[i].params.frequency_penalty for i in penalised],
                                     device=device)[:, None]
            scores = scores.index_copy(0, at, apply_penalties(scores[at], count, presence,
                                                              frequency))
        tokens = scores.argmax(-1)  # greedy rows' tokens
        sampled = [i for i, row in enumerate(rows) if not row.params.greedy]
        if sampled:
            at_sampled = torch.tensor(sampled, device=device)
            chosen = self._draw(scores[at_sampled], [rows[i] for i in sampled])
            tokens = tokens.index_copy(0, at_sampled, chosen)
        if penalised:
            self.counts(vocab).index_put_((slots, tokens[at]),
                                          torch.ones(len(penalised), device=device),
                                          accumulate=True)
        logprobs: list[TokenLogprobs | None] | None = None
        asked = [i for i, row in enumerate(rows) if row.params.logprobs is not None]
        if asked:
            logprobs = [None] * len(rows)
            at_asked = torch.tensor(asked, device=device)
            chosen_lp, top = token_logprobs(
                logits[at_asked], tokens[at_asked],
                min(max(rows[i].params.logprobs or 0 for i in asked), vocab))
            for row, (lp, pairs) in zip(asked, _pairs(chosen_lp, top)):
                logprobs[row] = (lp, pairs[:rows[row].params.logprobs or 0])
        return tokens.tolist(), logprobs

    def _draw(self, scores: torch.Tensor, rows: list[SequenceSampling]) -> torch.Tensor:
        """Sample one token per row of `scores` ([rows, vocab], penalised, not tempered)."""
        device = scores.device
        temperature = torch.tensor([row.params.temperature for row in rows],
                                   device=device)[:, None]
        scores = scores / temperature
        top_k = [row.params.top_k for row in rows]
        top_p = [row.params.top_p for row in rows]
        if any(k > 0 for k in top_k) or any(p < 1.0 for p in top_p):
            scores = filter_top_k_top_p(scores, torch.tensor(top_k, device=device),
                                        torch.tensor(top_p, device=device))
        probs = torch.softmax(scores, dim=-1)
        noise = torch.empty_like(probs)
        noise.exponential_(generator=self.generator)
        for index, row in enumerate(rows):
            if row.generator is not None:
                noise[index].exponential_(generator=row.generator)
        return (probs / noise.clamp_min_(1e-30)).argmax(-1)


def apply_penalties(scores: torch.Tensor, count: torch.Tensor, presence: torch.Tensor,
                    frequency: torch.Tensor) -> torch.Tensor:
    """OpenAI's `logit - presence * [count > 0] - frequency * count`, row by row ([rows, 1]
    penalties, [rows, vocab] counts)."""
    return scores - presence * (count > 0).to(scores.dtype) - frequency * count


def filter_top_k_top_p(scores: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor
                       ) -> torch.Tensor:
    """Per row: keep the `top_k` best scores (0: all), then of those the best whose
    renormalised probability mass reaches `top_p` (at least one); the rest become -inf."""
    vocab = scores.shape[-1]
    ordered, order = scores.sort(-1, descending=True)
    ranks = torch.arange(vocab, device=scores.device)[None, :]
    k = torch.where(top_k > 0, top_k, vocab).clamp(max=vocab)[:, None]
    ordered = ordered.masked_fill(ranks >= k, float("-inf"))
    probs = torch.softmax(ordered, dim=-1)
    before = probs.cumsum(-1) - probs  # mass of the tokens ranked above each one
    ordered = ordered.masked_fill((before >= top_p[:, None]) & (ranks > 0), float("-inf"))
    return torch.full_like(scores, float("-inf")).scatter(-1, order, ordered)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, k: int
                   ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """Raw log_softmax of `logits` ([rows, vocab]): the chosen `tokens`' ([rows]) and the top k
    (values, ids), or None for k = 0."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = logprobs.gather(1, tokens[:, None])[:, 0]
    if k <= 0:
        return chosen, None
    values, ids = logprobs.topk(k, dim=-1)
    return chosen, (values, ids)


def _pairs(chosen: torch.Tensor, top: tuple[torch.Tensor, torch.Tensor] | None
           ) -> list[TokenLogprobs]:
    chosen_list = chosen.tolist()
    if top is None:
        return [(lp, ()) for lp in chosen_list]
    values, ids = top[0].tolist(), top[1].tolist()
    return [(lp, tuple(zip(i, v))) for lp, i, v in zip(chosen_list, ids, values)]


def nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the most likely tokens whose mass reaches `top_p` (at least one), renormalised
    (one row; the engine uses `filter_top_k_top_p`)."""
    ordered, order = probs.sort(descending=True)
    before = ordered.cumsum(-1) - ordered  # mass of the tokens ranked above each one
    ordered = ordered.masked_fill(before >= top_p, 0.0)
    kept = torch.zeros_like(probs).scatter(-1, order, ordered)
    return kept / kept.sum()
