"""Row-wise attention over per-sequence KV caches: what lets sequences join and leave the
running batch at any token while each one computes exactly what it would alone.

The linear layers, norms and MLPs run batched ([B, 1, H] per decode step); attention runs per
row on that row's own cache (no padding, no mask), through transformers' own SDPA function, so
a sequence's attention is the same call `generate()` makes for it solo. The per-row caches are
plain `DynamicCache`s: a sequence that leaves drops its cache, one that joins brings the cache
of its prefill.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.cache_utils import Cache, DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward

ATTENTION_NAME = "kubemaas_rowwise"


class RowTensors(list):
    """The keys (or values) of each row after a cache update: one [1, heads, len_i, dim] each."""


class RowCache(Cache):
    """A batch view over one DynamicCache per sequence (row b of the batch is `rows[b]`)."""

    def __init__(self, rows: list[DynamicCache]) -> None:
        self.rows = rows
        self.layers: list = []
        self.layer_class_to_replicate = None
        self.offloading = False

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               *args, **kwargs):
        keys, values = RowTensors(), RowTensors()
        for row, cache in enumerate(self.rows):
            key, value = cache.update(key_states[row:row + 1], value_states[row:row + 1],
                                      layer_idx)
            keys.append(key)
            values.append(value)
        return keys, values

    def get_seq_length(self, layer_idx: int = 0) -> int:
        # callers pass position_ids, so this is only asked for by code paths that need a number
        return max((c.get_seq_length(layer_idx) for c in self.rows), default=0)

    @property
    def is_compileable(self) -> bool:
        return False


def rowwise_attention(module, query, key, value, attention_mask, **kwargs):
    """transformers' SDPA attention, one row at a time when the cache is a RowCache."""
    if not isinstance(key, RowTensors):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    outputs = [sdpa_attention_forward(module, query[row:row + 1], key[row], value[row], None,
                                      **kwargs)[0]
               for row in range(len(key))]
    return torch.cat(outputs, dim=0), None


def use_rowwise_attention(model: torch.nn.Module) -> None:
    """Register the attention function (idempotent) and switch `model` to it."""
    AttentionInterface.register(ATTENTION_NAME, rowwise_attention)
    model.set_attn_implementation(ATTENTION_NAME)
