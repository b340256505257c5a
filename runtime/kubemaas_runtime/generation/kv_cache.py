"""The paged KV cache and the attention that reads it: one flattened forward per engine step.

Each step the engine runs ONE model forward over a flat row of tokens: first one token per
decoding sequence, then the prefill chunks, each token with its own position. The model code is
untouched: transformers calls `PagedCache.update` with each layer's new keys and values and then
the attention function registered under `ATTENTION_NAME` (its attention-interface hook), which
is `paged_attention` here.

- **Pool.** Per layer, keys and values live in `[num_blocks, block_size, kv_heads, head_dim]`
  tensors (allocated at the first write, in the dtype the model writes). A sequence owns a list
  of blocks (its block table), taken from `BlockAllocator` when it is admitted.
- **Writes.** One `index_copy_` per layer for the keys and one for the values, through the
  step's slot mapping (slot = block * block_size + offset, one per token).
- **Decode rows.** One SDPA call per layer for all of them: their blocks gathered into padded
  `[rows, kv_heads, len, head_dim]` keys and values, a boolean mask of each row's length, and
  the queries packed per KV head (`[rows, kv_heads, heads/kv_heads, head_dim]`), so grouped-query
  attention needs no repeated K/V.
- **Prefill chunks.** One SDPA call per chunk: a chunk that starts the prompt attends to its own
  new keys, causally (transformers' own SDPA function, the call `generate()` makes); a later
  chunk attends to its sequence's gathered keys with an offset causal mask.
Outside a step (warm-up, the quantization probes) the attention is transformers' SDPA.
"""

from __future__ import annotations

import collections
import dataclasses
import math

import torch
from transformers import AttentionInterface
from transformers.cache_utils import Cache
from transformers.integrations.sdpa_attention import sdpa_attention_forward

ATTENTION_NAME = "kubemaas_paged"
DEFAULT_BLOCK_SIZE = 16


def kv_bytes_per_token(config, dtype: torch.dtype) -> int:
    """Bytes one token's keys and values take over all layers (for sizing the pool)."""
    text = getattr(config, "text_config", None) or config
    heads = int(text.num_attention_heads)
    kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(text, "head_dim", None) or text.hidden_size // heads)
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * int(text.num_hidden_layers) * kv_heads * head_dim * element


class BlockAllocator:
    """The pool's blocks: a free list, and the prefix cache.

    **Prefix cache.** A full block of prompt, once prefilled, is registered under a chained key
    (`block_keys`: the previous block's key and this block's tokens), so a later prompt that
    starts with the same tokens takes the block instead of computing it again. Blocks are
    reference-counted; a cached block nobody uses is kept, least recently released first out,
    until a fresh block is needed (then it is evicted). The cache lives in one engine, so its
    keys implicitly cover the model, its dtype and its quantization.

    A sequence takes its whole block table (prompt + max_tokens) at admission, the prefix
    cache's blocks shared and only the rest fresh (`peek` says what that costs first), so an
    admitted sequence never needs another block: cached blocks not in use count as free."""

    def __init__(self, num_blocks: int, *, prefix_caching: bool = False) -> None:
        self.num_blocks = num_blocks
        self.prefix_caching = prefix_caching
        self._free = list(range(num_blocks - 1, -1, -1))
        self._refs = [0] * num_blocks
        self._cached: dict[object, int] = {}  # chained key -> block
        self._key_of: dict[int, object] = {}  # block -> its key
        self._idle: collections.OrderedDict[int, None] = collections.OrderedDict()  # LRU

    @property
    def free_blocks(self) -> int:
        return len(self._free) + len(self._idle)

    @property
    def usage(self) -> float:
        """The share of blocks held by running sequences (idle cached blocks are free)."""
        return 1.0 - self.free_blocks / self.num_blocks

    def peek(self, keys: list[object]) -> tuple[int, int]:
        """(cached, idle): how many blocks `lookup(keys)` would take, and how many of those
        no sequence holds now (taking them shrinks the free pool)."""
        cached = idle = 0
        for key in keys if self.prefix_caching else ():
            block = self._cached.get(key)
            if block is None:
                break
            cached += 1
            idle += self._refs[block] == 0
        return cached, idle

    def allocate(self, count: int) -> list[int]:
        if count > self.free_blocks:
            raise RuntimeError(f"KV cache exhausted: {count} blocks asked, "
                               f"{self.free_blocks} free")
        taken = []
        for _ in range(count):
            if self._free:
                block = self._free.pop()
            else:  # evict the least recently used cached block
                block, _ = self._idle.popitem(last=False)
                del self._cached[self._key_of.pop(block)]
            self._refs[block] = 1
            taken.append(block)
        return taken

    def free(self, blocks: list[int]) -> None:
        for block in reversed(blocks):
            self._refs[block] -= 1
            if self._refs[block] == 0:
                if block in self._key_of:
                    self._idle[block] = None  # most recently released last
                else:
                    self._free.append(block)

    def lookup(self, keys: list[object]) -> list[int]:
        """The cached blocks of the longest run of `keys` from the first, each now held."""
        hits = []
        for key in keys if self.prefix_caching else ():
            block = self._cached.get(key)
            if block is None:
                break
            if self._refs[block] == 0:
                del self._idle[block]
            self._refs[block] += 1
            hits.append(block)
        return hits

    def register(self, block: int, key: object) -> None:
        """`block` now holds the full prompt block `key` names."""
        if self.prefix_caching and key not in self._cached and block not in self._key_of:
            self._cached[key] = block
            self._key_of[block] = key


def block_keys(tokens: list[int], block_size: int) -> list[object]:
    """Chained keys of the full blocks of `tokens`: block i's key covers tokens
    [0, (i + 1) * block_size), as (hash of block i - 1's key, block i's tokens)."""
    keys: list[object] = []
    parent = 0
    for start in range(0, len(tokens) - block_size + 1, block_size):
        key = (parent, tuple(tokens[start:start + block_size]))
        keys.append(key)
        parent = hash(key)
    return keys


@dataclasses.dataclass
class Chunk:
    """A prefill chunk in the step: `length` tokens from flat index `start`, at positions
    `offset`..`offset + length - 1` of the sequence whose blocks are `blocks`."""

    start: int
    length: int
    offset: int
    blocks: torch.Tensor  # [blocks covering offset + length] block ids


@dataclasses.dataclass
class StepBatch:
    """What one flattened forward holds, computed once per step (not per layer)."""

    slot_mapping: torch.Tensor  # [tokens] pool slot of each token
    decode_rows: int  # the first `decode_rows` tokens are decode rows, one per sequence
    decode_blocks: torch.Tensor | None  # [decode_rows, max blocks] block tables (padded)
    decode_mask: torch.Tensor | None  # [decode_rows, 1, 1, max blocks * block_size] bool
    chunks: list[Chunk]


class PagedKVCache:
    """The pool, one key and one value tensor per layer: `num_blocks` blocks for sequences and
    one more, `scratch` (zeroed, in no block table), that compiled decode's padding rows write
    to and read (compiled_decode.py)."""

    def __init__(self, num_blocks: int, block_size: int, device: torch.device) -> None:
        self.num_blocks = num_blocks
        self.scratch = num_blocks
        self.block_size = block_size
        self.device = device
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.clean = 0  # blocks [0, clean) hold finite numbers in every layer
        # Gathers land in two buffers reused by every layer and step (grown when a step needs
        # more): a fresh multi-MB tensor per layer costs the page faults of new memory, about
        # 3/4 of the gather's time on CPU. False: a new tensor per gather (the benchmark's
        # "before").
        self.reuse_buffers = True
        self._buffers: dict[int, torch.Tensor] = {}

    def ensure_clean(self, upto: int) -> None:
        """Zero blocks [clean, upto) before a sequence uses them. A gathered block is read
        whole, masked past the sequence's length, and a masked slot still multiplies its value
        by zero: an uninitialised NaN there would poison the row. Freed blocks hold the finite
        keys and values of their last owner, so only never-used blocks need this."""
        if upto > self.clean:
            for pool in (*self.keys.values(), *self.values.values()):
                pool[self.clean:upto].zero_()
            self.clean = upto

    def layer(self, layer_idx: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's pools; `like` is a [batch, kv_heads, tokens, head_dim] tensor the model
        writes (gives the shape and dtype on the first write)."""
        if layer_idx not in self.keys:
            shape = (self.num_blocks + 1, self.block_size, like.shape[1], like.shape[3])
            # empty, not zeros: memory is committed as blocks are first used (ensure_clean)
            for pools in (self.keys, self.values):
                pools[layer_idx] = torch.empty(shape, dtype=like.dtype, device=self.device)
                pools[layer_idx][:self.clean].zero_()
                pools[layer_idx][self.scratch].zero_()
        return self.keys[layer_idx], self.values[layer_idx]

    def allocate(self, model: torch.nn.Module) -> None:
        """Allocate every layer's pools now (they are otherwise allocated at the first write):
        one eager decode row of token 0 at position 0 into the scratch block."""
        batch = self.step([([self.scratch], 0)], [])
        model(input_ids=torch.zeros((1, 1), dtype=torch.long, device=self.device),
              position_ids=torch.zeros((1, 1), dtype=torch.long, device=self.device),
              cache=PagedCache(self, batch), use_cache=True)

    def gather(self, pool: torch.Tensor, blocks: torch.Tensor, which: int) -> torch.Tensor:
        """[rows, blocks] block ids -> [rows, kv_heads, blocks * block_size, head_dim] (a
        transposed view of one of the reused buffers, `which` 0 for keys and 1 for values:
        valid until the next gather into the same one)."""
        rows, width = blocks.shape
        flat = blocks.reshape(-1)
        if self.reuse_buffers and not torch.compiler.is_compiling():  # inductor plans its own
            buffer = self._buffers.get(which)
            count = flat.shape[0]
            if (buffer is None or buffer.shape[0] < count or buffer.dtype != pool.dtype
                    or buffer.shape[1:] != pool.shape[1:]):
                buffer = torch.empty((max(count, 2 * (buffer.shape[0] if buffer is not None
                                                      else 0)), *pool.shape[1:]),
                                     dtype=pool.dtype, device=pool.device)
                self._buffers[which] = buffer
            gathered = torch.index_select(pool, 0, flat, out=buffer[:count])
        else:
            gathered = pool[flat]  # [rows * width, block_size, kv_heads, head_dim]
        return gathered.view(rows, width * pool.shape[1], pool.shape[2],
                             pool.shape[3]).transpose(1, 2)

    def step(self, decodes: list[tuple[list[int], int]],
             prefills: list[tuple[list[int], int, int]]) -> StepBatch:
        """The step's metadata. `decodes`: (block table, position) of each decode row;
        `prefills`: (block table, offset, length) of each chunk, in flat order after them."""
        size = self.block_size
        slots: list[int] = []
        for blocks, position in decodes:
            slots.append(blocks[position // size] * size + position % size)
        decode_blocks = decode_mask = None
        if decodes:
            width = max(position // size + 1 for _, position in decodes)
            table = [blocks[:width] + [0] * (width - len(blocks[:width]))
                     for blocks, _ in decodes]
            decode_blocks = torch.tensor(table, device=self.device)
            lengths = torch.tensor([position + 1 for _, position in decodes], device=self.device)
            decode_mask = (torch.arange(width * size, device=self.device)[None, :]
                           < lengths[:, None])[:, None, None, :]
        chunks = []
        start = len(decodes)
        for blocks, offset, length in prefills:
            for position in range(offset, offset + length):
                slots.append(blocks[position // size] * size + position % size)
            needed = math.ceil((offset + length) / size)
            chunks.append(Chunk(start, length, offset,
                                torch.tensor(blocks[:needed], device=self.device)))
            start += length
        return StepBatch(torch.tensor(slots, device=self.device), len(decodes), decode_blocks,
                         decode_mask, chunks)


class PagedKV:
    """What `PagedCache.update` hands the attention function in place of a layer's keys (or
    values): the new ones and a reference to the pool."""

    def __init__(self, new: torch.Tensor, pool: torch.Tensor, cache: PagedCache) -> None:
        self.new = new  # [1, kv_heads, tokens, head_dim]
        self.pool = pool  # [num_blocks, block_size, kv_heads, head_dim]
        self.cache = cache


class PagedCache(Cache):
    """The transformers Cache the engine passes for one step: writes go to the pool."""

    def __init__(self, kv: PagedKVCache, batch: StepBatch) -> None:
        self.kv = kv
        self.batch = batch
        self.layers: list = []
        self.layer_class_to_replicate = None
        self.offloading = False

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               *args, **kwargs):
        keys, values = self.kv.layer(layer_idx, key_states)
        slots = self.batch.slot_mapping
        flat_keys = keys.view(-1, keys.shape[2], keys.shape[3])
        flat_values = values.view(-1, values.shape[2], values.shape[3])
        flat_keys.index_copy_(0, slots, key_states[0].transpose(0, 1))
        flat_values.index_copy_(0, slots, value_states[0].transpose(0, 1))
        return PagedKV(key_states, keys, self), PagedKV(value_states, values, self)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # callers pass position_ids; nothing asks this in a step

    @property
    def is_compileable(self) -> bool:
        return False


def paged_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """The attention-interface function: the paged path inside an engine step, transformers'
    SDPA otherwise. `query`: [1, heads, tokens, head_dim]; returns [1, tokens, heads, head_dim]."""
    if not isinstance(key, PagedKV):
        return sdpa_attention_forward(module, query, key, value, attention_mask,
                                      scaling=scaling, **kwargs)
    batch = key.cache.batch
    heads, tokens, head_dim = query.shape[1], query.shape[2], query.shape[3]
    kv_heads = key.new.shape[1]
    out = query.new_empty(tokens, heads, head_dim)
    rows = batch.decode_rows
    if rows:
        group = heads // kv_heads
        # [heads, rows, dim] -> [rows, kv_heads, group, dim]: a KV head's queries side by side
        q = query[0, :, :rows].transpose(0, 1).reshape(rows, kv_heads, group, head_dim)
        k = key.cache.kv.gather(key.pool, batch.decode_blocks, 0)
        v = key.cache.kv.gather(value.pool, batch.decode_blocks, 1)
        attended = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=batch.decode_mask, scale=scaling)
        out[:rows] = attended.reshape(rows, heads, head_dim)
    for chunk in batch.chunks:
        span = slice(chunk.start, chunk.start + chunk.length)
        q = query[:, :, span]
        if chunk.offset == 0:  # the prompt's first chunk: its own keys, causal
            attended = sdpa_attention_forward(module, q, key.new[:, :, span],
                                              value.new[:, :, span], None, scaling=scaling,
                                              **kwargs)[0]
        else:
            end = chunk.offset + chunk.length
            k = key.cache.kv.gather(key.pool, chunk.blocks[None], 0)[:, :, :end]
            v = key.cache.kv.gather(value.pool, chunk.blocks[None], 1)[:, :, :end]
            causal = (torch.arange(end, device=query.device)[None, :]
                      <= chunk.offset + torch.arange(chunk.length, device=query.device)[:, None])
            attended = torch.nn.functional.scaled_dot_product_attention(
                q, k, v, attn_mask=causal, scale=scaling,
                enable_gqa=kv_heads != heads).transpose(1, 2)
        out[span] = attended[0]
    return out[None], None


def use_paged_attention(model: torch.nn.Module) -> None:
    """Register the attention function (idempotent) and switch `model` to it."""
    AttentionInterface.register(ATTENTION_NAME, paged_attention)
    model.set_attn_implementation(ATTENTION_NAME)
