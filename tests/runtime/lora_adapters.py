"""Tiny LoRA adapters made here with peft, and peft's own merged-model greedy reference."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def build_adapter(base_dir: Path, out: Path, *, seed: int, r: int = 4,
                  targets: tuple[str, ...] = ("q_proj", "v_proj"), scale: float = 1.0) -> Path:
    """A random (non-zero) LoRA on the model in `base_dir`, saved as safetensors."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets),
                        init_lora_weights=False, lora_dropout=0.0)
    peft_model = get_peft_model(model, config)
    if scale != 1.0:
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_B" in name:
                    param.mul_(scale)
    peft_model.save_pretrained(out, safe_serialization=True)
    return out


def edit_config(adapter_dir: Path, out: Path, **changes) -> Path:
    """A copy of an adapter whose adapter_config.json has `changes`."""
    out.mkdir(parents=True, exist_ok=True)
    for file in adapter_dir.iterdir():
        (out / file.name).write_bytes(file.read_bytes())
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    config.update(changes)
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


def merged_greedy(base_dir: Path, adapter_dir: Path | None, prompt_ids: list[int],
                  max_new_tokens: int) -> list[int]:
    """peft's merged model's greedy `generate` (the base model's when adapter_dir is None)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    model.eval()
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(
            1, len(prompt_ids), dtype=torch.long), max_new_tokens=max_new_tokens,
            do_sample=False, pad_token_id=model.config.pad_token_id)
    return out[0, len(prompt_ids):].tolist()
