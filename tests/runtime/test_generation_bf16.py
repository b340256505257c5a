"""bf16 on the builtin engine, issue 25's exactness contract: "bf16 agreement >= 99% with logit
cosine >= 0.999". SmolLM2-135M-Instruct (hack/smollm2-transformers) cast to bf16 as
`--quantization bf16` casts it, eight chat prompts with their greedy continuations read
together through the paged cache (one in chunks of 7 tokens while the others prefill half and
decode the rest a token per step, all in the same steps), compared at every position:

- against the plain bf16 forward of the same tokens: what batching, chunking and the paged
  attention change in bf16;
- against the plain fp32 forward: what serving in bf16 changes.

What the contract can honestly be (measured 2026-12-07 on this file's eight prompts): bf16 keeps
8 significant bits, so a logit near 20 moves in steps of 0.125, and greedy flips wherever the
reference's two best logits are that close. Over all 492 positions the paged bf16 engine agrees
with fp32 at 97.0% (plain bf16 against fp32: 97.4%; paged bf16 against plain bf16: 98.8%; over the
192 generated positions alone 96.9%, 97.9% and 97.9%), every disagreement at a reference top-2 gap
of at most 0.125, with mean logit cosine 0.9994 (smallest 0.989). The issue's ">= 99% agreement"
is therefore missed by bf16 itself, not by the engine; what is asserted is:

- the mean logit cosine over every position >= 0.999 (the issue's figure), the smallest >= 0.98;
- every greedy disagreement is at a near-tie at bf16's resolution: the reference's two best
  logits within two bf16 steps (2 * 2**(exponent - 7)) of its best logit;
- agreement >= 95%, a floor under the measured 97.0% that a real regression falls through.

"""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
from kubemaas_runtime.generation.causal_lm import load_causal_lm
from kubemaas_runtime.generation.kv_cache import (
    BlockAllocator,
    PagedCache,
    PagedKVCache,
    use_paged_attention,
)
from kubemaas_runtime.quantization import CAST_DTYPES

from tests.models_on_disk import smollm2_transformers_dir

AGREEMENT = 0.95  # the measured 97.0% (docstring), less margin; the 99% is missed
MEAN_COSINE = 0.999
MIN_COSINE = 0.98
QUESTIONS = [
    "What is the capital of France?",
    "Name three primary colours.",
    "Write a haiku about the sea.",
    "How many legs does a spider have?",
    "Explain what a CPU does in one sentence.",
    "What is 12 times 12?",
    "Give me a synonym for happy.",
    "Why is the sky blue?",
]
CONTINUATION = 24  # greedy tokens after each prompt


@pytest.fixture(scope="module")
def models():
    fp32 = load_causal_lm(smollm2_transformers_dir(), "transformers", torch.device("cpu"))
    bf16 = copy.copy(fp32)
    bf16.model = copy.deepcopy(fp32.model).to(CAST_DTYPES["bf16"])
    for lm in (fp32, bf16):
        use_paged_attention(lm.model)
    return fp32, bf16


def chat_prompts(lm) -> list[list[int]]:
    return [lm.tokenizer.apply_chat_template([{"role": "user", "content": q}],
                                             add_generation_prompt=True, tokenize=True,
                                             return_dict=False)
            for q in QUESTIONS]


def plain_logits(lm, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return lm.model(input_ids=torch.tensor([ids])).logits[0].float()


def with_greedy_continuation(lm, prompt: list[int]) -> list[int]:
    ids = list(prompt)
    for _ in range(CONTINUATION):
        ids.append(int(plain_logits(lm, ids)[-1].argmax()))
    return ids


def paged_logits(lm, sequences: list[list[int]], chunk: int = 7) -> list[torch.Tensor]:
    """Each sequence's logits at every position, read together through the paged cache as the
    engine's steps read them: decode rows first, then prefill chunks; sequence 0 all in chunks
    of `chunk` tokens, the others their first half in one chunk and then a token per step."""
    size = 16
    needed = [math.ceil(len(s) / size) for s in sequences]
    kv = PagedKVCache(sum(needed), size, torch.device("cpu"))
    allocator = BlockAllocator(sum(needed))
    tables = [allocator.allocate(n) for n in needed]
    kv.ensure_clean(sum(needed))
    split = [len(sequences[0])] + [len(s) // 2 for s in sequences[1:]]
    done = [0] * len(sequences)
    got: list[list[torch.Tensor]] = [[] for _ in sequences]
    with torch.inference_mode():
        while any(d < len(s) for d, s in zip(done, sequences, strict=True)):
            decodes, prefills, ids, positions, owners = [], [], [], [], []
            for i, s in enumerate(sequences):
                if split[i] <= done[i] < len(s):
                    decodes.append((tables[i], done[i]))
                    ids.append(s[done[i]])
                    positions.append(done[i])
                    owners.append((i, 1))
            for i, s in enumerate(sequences):
                if done[i] < split[i]:
                    n = min(chunk if i == 0 else split[i], split[i] - done[i])
                    prefills.append((tables[i], done[i], n))
                    ids += s[done[i]:done[i] + n]
                    positions += range(done[i], done[i] + n)
                    owners.append((i, n))
            batch = kv.step(decodes, prefills)
            logits = lm.model(input_ids=torch.tensor([ids]), position_ids=torch.tensor(
                [positions]), cache=PagedCache(kv, batch), use_cache=True).logits[0].float()
            start = 0
            for i, n in owners:
                got[i].append(logits[start:start + n])
                done[i] += n
                start += n
    return [torch.cat(parts) for parts in got]


def bf16_step(value: torch.Tensor) -> torch.Tensor:
    """bf16's spacing at `value` (8 significant bits)."""
    return torch.exp2(torch.floor(torch.log2(value.abs().clamp_min(1e-6))) - 7)


@dataclasses.dataclass
class Agreement:
    share: float  # positions whose greedy token is the reference's
    mean_cosine: float
    min_cosine: float
    unexplained: list[tuple[int, float]]  # (position, reference top-2 gap) of non-tie flips

    def holds(self) -> bool:
        return (self.share >= AGREEMENT and self.mean_cosine >= MEAN_COSINE
                and self.min_cosine >= MIN_COSINE and not self.unexplained)


def compare(got: list[torch.Tensor], want: list[torch.Tensor]) -> Agreement:
    got_all, want_all = torch.cat(got), torch.cat(want)
    agree = got_all.argmax(-1) == want_all.argmax(-1)
    cosine = torch.nn.functional.cosine_similarity(got_all, want_all, dim=-1)
    top2 = want_all.topk(2, dim=-1).values
    gap = top2[:, 0] - top2[:, 1]
    tie = gap <= 2 * bf16_step(top2[:, 0])
    flips = (~agree & ~tie).nonzero().flatten().tolist()
    return Agreement(float(agree.float().mean()), float(cosine.mean()), float(cosine.min()),
                     [(i, round(float(gap[i]), 4)) for i in flips])


@pytest.fixture(scope="module")
def sequences(models):
    fp32, _ = models
    return [with_greedy_continuation(fp32, p) for p in chat_prompts(fp32)]


@pytest.mark.parametrize("reference", ["bf16", "fp32"])
def test_bf16_paged_steps_agree_with_the_plain_forward(models, sequences, reference):
    """Against the plain bf16 forward: what batching, chunking and the paged attention change;
    against the plain fp32 forward: what serving in bf16 changes."""
    fp32, bf16 = models
    assert next(bf16.model.parameters()).dtype == torch.bfloat16
    got = paged_logits(bf16, sequences)
    want = [plain_logits(bf16 if reference == "bf16" else fp32, s) for s in sequences]
    result = compare(got, want)
    print(f"bf16 paged vs plain {reference}: {result}")
    assert result.holds(), result


def test_the_comparison_sees_a_wrong_model(models, sequences):
    """The check can fail: the logits of a model with one layer's weights scrambled do not
    pass it."""
    fp32, _ = models
    broken = copy.copy(fp32)
    broken.model = copy.deepcopy(fp32.model)
    with torch.no_grad():
        weight = broken.model.model.layers[0].mlp.down_proj.weight
        weight.copy_(weight[torch.randperm(weight.shape[0], generator=torch.Generator()
                                            .manual_seed(0))])
    result = compare([plain_logits(broken, s) for s in sequences[:2]],
                     [plain_logits(fp32, s) for s in sequences[:2]])
    assert not result.holds(), result
    assert result.unexplained, result  # flips away from any tie
