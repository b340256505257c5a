"""Loading a causal LM for `--task text-generation`: a transformers directory
(AutoModelForCausalLM, safetensors only, trust_remote_code off) or a GGUF file (a `.gguf` path,
or a directory holding exactly one), dequantized to torch tensors by transformers' GGUF support.
The tokenizer and chat template come from the same files."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch

from kubemaas_runtime.errors import InvalidInput, ModelLoadFailed

# Roles a chat template is given; OpenAI's "developer" is the newer name of "system".
CHAT_ROLES = ("system", "developer", "user", "assistant")


@dataclasses.dataclass
class CausalLM:
    """A loaded causal LM with what generation needs to know about it."""

    model: torch.nn.Module
    tokenizer: Any  # a transformers PreTrainedTokenizerBase
    eos_token_ids: frozenset[int]
    context_length: int  # the model's own limit (max_position_embeddings)
    source: str  # "transformers" or "gguf"

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def encode(self, text: str) -> list[int]:
        """Prompt tokens as `generate()` would be given them (the tokenizer's own specials)."""
        return list(self.tokenizer(text)["input_ids"])

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        if not self.has_chat_template:
            raise InvalidInput("this model has no chat template: use /v1/completions")
        try:
            rendered = self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=False)
        except Exception as exc:  # noqa: BLE001 - a template may raise on what it refuses
            raise InvalidInput(f"messages: the model's chat template refused them: {exc}") from None
        # the template writes the specials itself (bos included): never add them twice
        return list(self.tokenizer(rendered, add_special_tokens=False)["input_ids"])

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)


def find_gguf_file(path: Path) -> Path:
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelLoadFailed(f"{path} is not a .gguf file")
        return path
    if not path.is_dir():
        raise ModelLoadFailed(f"{path} does not exist")
    found = sorted(path.glob("*.gguf"))
    if len(found) != 1:
        raise ModelLoadFailed(f"{path} must hold exactly one .gguf file, found {len(found)}")
    return found[0]


def load_causal_lm(path: Path, format: str, device: torch.device) -> CausalLM:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # serving never reaches for the hub
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any]
    if format == "gguf":
        gguf = find_gguf_file(path)
        directory, kwargs = str(gguf.parent), {"gguf_file": gguf.name}
    else:
        if not (path / "config.json").is_file():
            raise ModelLoadFailed(f"{path} is not a transformers directory (no config.json)")
        if not any(path.glob("*.safetensors")):
            raise ModelLoadFailed(f"{path} has no .safetensors weights (pickled weights are "
                                  f"never loaded)")
        directory, kwargs = str(path), {"use_safetensors": True}
    common: dict[str, Any] = {"local_files_only": True, "trust_remote_code": False, **kwargs}
    try:
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, **common)
        tokenizer = AutoTokenizer.from_pretrained(directory, **common)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelLoadFailed(f"cannot load a causal LM from {path}: {type(exc).__name__}: "
                              f"{exc}") from None
    model = model.to(device).eval()
    return CausalLM(model, tokenizer, eos_token_ids(model, tokenizer),
                    int(getattr(model.config, "max_position_embeddings", 0) or 2048), format)


def eos_token_ids(model: torch.nn.Module, tokenizer: Any) -> frozenset[int]:
    """What ends a sequence: the generation config's eos ids (what `generate()` stops on),
    else the tokenizer's."""
    ids: set[int] = set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if configured is None:
        configured = getattr(model.config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(int(i) for i in configured)
    if not ids and tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return frozenset(ids)
