"""Hugging Face transformers directories (config, safetensors weights, tokenizer), tokenized in
the server so clients send strings: `feature-extraction` (sentence embeddings, pooled and
L2-normalised as sentence-transformers computes them) and `text-classification`."""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kubemaas_runtime.errors import InvalidInput, ModelLoadFailed
from kubemaas_runtime.models.base import Model, Signature, TensorSpec
from kubemaas_runtime.protocol import Tensor

TEXT_INPUT = TensorSpec("text", "BYTES", (-1,))
# A request already tokenized (the OpenAI embeddings route, embeddings.py): an object array of
# lists of token ids. Never a v2 input: the v2 route accepts only the signature's `text`.
TOKEN_IDS = "token_ids"
WARMUP_TEXTS: list[str | list[int]] = [
    "warm up", "a slightly longer sentence to warm up the model with padding"]


class TextTokenizer:
    """The fast `tokenizers` tokenizer when tokenizer.json exists, else transformers'.

    A text becomes token ids (special tokens added), truncated to `max_length` for the model
    (`__call__`) or whole for counting (`token_ids`); rows of ids are padded per batch."""

    def __init__(self, model_dir: Path, max_length: int) -> None:
        self.max_length = max_length
        tokenizer_json = model_dir / "tokenizer.json"
        self._hf = None
        if tokenizer_json.is_file():
            from tokenizers import Tokenizer

            self._whole = Tokenizer.from_file(str(tokenizer_json))
            self._whole.no_padding()
            self._whole.no_truncation()
            self._fast = Tokenizer.from_file(str(tokenizer_json))
            self._fast.no_padding()
            self._fast.enable_truncation(max_length=max_length)
            pad_token = _tokenizer_config(model_dir).get("pad_token") or "[PAD]"
            if isinstance(pad_token, dict):
                pad_token = pad_token.get("content", "[PAD]")
            self.pad_id = self._fast.token_to_id(pad_token) or 0
        else:
            from transformers import AutoTokenizer

            self._fast = None
            self._hf = AutoTokenizer.from_pretrained(str(model_dir))
            self.pad_id = self._hf.pad_token_id or 0

    def __call__(self, rows: list[str | list[int]]) -> dict[str, torch.Tensor]:
        """Texts tokenized and truncated, token-id rows as given, padded together."""
        texts = [row for row in rows if isinstance(row, str)]
        encoded = iter(self._ids(texts, truncate=True))
        return self.pad([next(encoded) if isinstance(row, str) else row for row in rows])

    def token_ids(self, texts: list[str]) -> list[list[int]]:
        """Every token of each text, special tokens included, never truncated."""
        return self._ids(texts, truncate=False)

    def _ids(self, texts: list[str], truncate: bool) -> list[list[int]]:
        if not texts:
            return []
        if self._hf is not None:
            kwargs = {"truncation": True, "max_length": self.max_length} if truncate else {}
            return [list(ids) for ids in self._hf(texts, **kwargs)["input_ids"]]
        tokenizer = self._fast if truncate else self._whole
        return [e.ids for e in tokenizer.encode_batch(texts)]

    def pad(self, rows: list[list[int]]) -> dict[str, torch.Tensor]:
        """Right padding to the longest row, as the tokenizers pad a batch (one segment:
        token_type_ids 0)."""
        width = max(len(row) for row in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.int64)
        mask = torch.zeros((len(rows), width), dtype=torch.int64)
        for i, row in enumerate(rows):
            ids[i, :len(row)] = torch.tensor(row, dtype=torch.int64)
            mask[i, :len(row)] = 1
        return {"input_ids": ids, "attention_mask": mask,
                "token_type_ids": torch.zeros_like(ids)}


def _tokenizer_config(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "tokenizer_config.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _max_length(model_dir: Path, config: Any) -> int:
    """sentence-transformers' max_seq_length, else the tokenizer's, capped by the positions."""
    limit = getattr(config, "max_position_embeddings", 512) or 512
    st_config = model_dir / "sentence_bert_config.json"
    if st_config.is_file():
        value = json.loads(st_config.read_text()).get("max_seq_length")
        if value:
            return min(int(value), limit)
    value = _tokenizer_config(model_dir).get("model_max_length")
    if isinstance(value, int) and 0 < value < 1_000_000:
        return min(value, limit)
    return limit


def decode_texts(tensor: Tensor) -> list[str]:
    texts = []
    for item in tensor.data.reshape(-1):
        if isinstance(item, bytes):
            try:
                item = item.decode("utf-8")
            except UnicodeDecodeError:
                raise InvalidInput(f"input '{tensor.name}': BYTES element is not UTF-8") from None
        texts.append(item)
    return texts


class TransformersModel(Model):
    platform = "transformers"
    auto_class = "AutoModel"

    def __init__(self, options) -> None:
        super().__init__(options)
        self._model: torch.nn.Module | None = None
        self._tokenizer: TextTokenizer | None = None
        self._forward_args: set[str] = set()
        self.vocab_size = 0

    def load(self) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # serving never reaches for the hub
        import transformers

        path = self.options.path
        if not (path / "config.json").is_file():
            raise ModelLoadFailed(f"{path} is not a transformers directory (no config.json)")
        if not any(path.glob("*.safetensors")):
            raise ModelLoadFailed(f"{path} has no .safetensors weights (pickled weights are "
                                  f"never loaded)")
        auto = getattr(transformers, self.auto_class)
        try:
            model = auto.from_pretrained(str(path), use_safetensors=True,
                                         local_files_only=True, trust_remote_code=False)
        except (OSError, ValueError) as exc:
            raise ModelLoadFailed(f"cannot load {path}: {exc}") from None
        model = model.to(self.device).eval()
        self._forward_args = set(inspect.signature(model.forward).parameters)
        self._tokenizer = TextTokenizer(path, _max_length(path, model.config))
        self.vocab_size = int(model.config.vocab_size)  # token ids a request may send
        self._model = model
        self._after_load(model.config)
        self._model = self.quantize(model).module
        self.ready = True

    def _after_load(self, config: Any) -> None:
        raise NotImplementedError

    def warmup(self) -> None:
        self._run(WARMUP_TEXTS)

    def prepare(self, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        text = inputs["text"]
        decoded = np.array(decode_texts(text), dtype=object).reshape(text.data.shape)
        return {"text": Tensor(text.name, text.datatype, text.shape, decoded)}

    @property
    def tokenizer(self) -> TextTokenizer:
        return self._tokenizer

    def _encode(self, rows: list[str | list[int]]) -> dict[str, torch.Tensor]:
        encoded = self._tokenizer(rows)
        return {k: v.to(self.device) for k, v in encoded.items() if k in self._forward_args}

    def _run(self, rows: list[str | list[int]]) -> list[np.ndarray]:
        raise NotImplementedError

    def predict(self, batch: list[dict[str, Tensor]]) -> list[list[Tensor]]:
        per_request: list[list] = [
            list(inputs[TOKEN_IDS].data) if TOKEN_IDS in inputs else decode_texts(inputs["text"])
            for inputs in batch]
        outputs = self._run([t for request_texts in per_request for t in request_texts])
        results = []
        start = 0
        for request_texts in per_request:
            end = start + len(request_texts)
            results.append([Tensor(spec.name, spec.datatype, (end - start, *array.shape[1:]),
                                   array[start:end])
                            for spec, array in zip(self.signature.outputs, outputs)])
            start = end
        return results


class FeatureExtractionModel(TransformersModel):
    """Sentence embeddings: pooled token embeddings (mean unless 1_Pooling says otherwise),
    L2-normalised."""

    def _after_load(self, config: Any) -> None:
        pooling_file = self.options.path / "1_Pooling" / "config.json"
        pooling = json.loads(pooling_file.read_text()) if pooling_file.is_file() else {}
        if pooling.get("pooling_mode_cls_token"):
            self._pooling = "cls"
        elif pooling.get("pooling_mode_max_tokens"):
            self._pooling = "max"
        else:
            self._pooling = "mean"
        self.signature = Signature(
            (TEXT_INPUT,), (TensorSpec("embedding", "FP32", (-1, int(config.hidden_size))),))

    @property
    def dimension(self) -> int:
        (spec,) = self.signature.outputs
        return spec.shape[1]

    def _run(self, rows: list[str | list[int]]) -> list[np.ndarray]:
        encoded = self._encode(rows)
        hidden = self._model(**encoded).last_hidden_state.float()
        mask = encoded["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        if self._pooling == "cls":
            pooled = hidden[:, 0]
        elif self._pooling == "max":
            pooled = hidden.masked_fill(mask == 0, -1e9).max(dim=1).values
        else:
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        embeddings = torch.nn.functional.normalize(pooled, p=2, dim=1)
        return [embeddings.cpu().numpy()]


class TextClassificationModel(TransformersModel):
    """Labels and scores: the top label, its probability, and every label's probability."""

    auto_class = "AutoModelForSequenceClassification"

    def _after_load(self, config: Any) -> None:
        count = int(config.num_labels)
        id2label = getattr(config, "id2label", None) or {}
        self._labels = np.array(
            [str(id2label.get(i, id2label.get(str(i), f"LABEL_{i}"))) for i in range(count)],
            dtype=object)
        self._multi_label = getattr(config, "problem_type", None) == "multi_label_classification"
        self.signature = Signature((TEXT_INPUT,), (
            TensorSpec("label", "BYTES", (-1,)),
            TensorSpec("score", "FP32", (-1,)),
            TensorSpec("probabilities", "FP32", (-1, count)),
        ))

    def _run(self, rows: list[str | list[int]]) -> list[np.ndarray]:
        logits = self._model(**self._encode(rows)).logits.float()
        probs = torch.sigmoid(logits) if self._multi_label else torch.softmax(logits, dim=-1)
        scores, best = probs.max(dim=-1)
        return [self._labels[best.cpu().numpy()], scores.cpu().numpy(), probs.cpu().numpy()]
