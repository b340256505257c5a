"""Tiny models the runtime tests build, and the factories `--architecture` points at
(imported by the server process as `tests.runtime.tiny_models:...`)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

FEATURES = 4
CLASSES = 3


class TinyMLP(torch.nn.Module):
    def __init__(self, hidden: int = 8) -> None:
        super().__init__()
        self.first = torch.nn.Linear(FEATURES, hidden)
        self.second = torch.nn.Linear(hidden, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(torch.relu(self.first(x)))


class SlowMLP(TinyMLP):
    """TinyMLP whose forward also sleeps, so requests pile up behind it."""

    def __init__(self, hidden: int = 8, delay_s: float = 0.1) -> None:
        super().__init__(hidden)
        self.delay_s = delay_s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(self.delay_s)
        return super().forward(x)


class TwoHeads(torch.nn.Module):
    """Two inputs of different datatypes, two outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(FEATURES, CLASSES)

    def forward(self, x: torch.Tensor, offset: torch.Tensor):
        return self.linear(x), offset * 2


def make_mlp(hidden: int = 8) -> TinyMLP:
    return TinyMLP(hidden)


def make_slow_mlp(hidden: int = 8, delay_s: float = 0.1, load_delay_s: float = 0.0) -> SlowMLP:
    time.sleep(load_delay_s)  # a model that takes a while to load
    return SlowMLP(hidden, delay_s)


def seeded(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    return module.eval()


def mlp_signature() -> dict:
    return {"inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, FEATURES]}],
            "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, CLASSES]}]}


def build_torchscript(directory: Path) -> TinyMLP:
    """A traced TwoHeads-free MLP saved without any signature file (names from the schema)."""
    model = seeded(TinyMLP())
    traced = torch.jit.trace(model, torch.zeros(2, FEATURES))
    directory.mkdir(parents=True, exist_ok=True)
    torch.jit.save(traced, str(directory / "model.pt"))
    return model


def build_exported(directory: Path) -> TwoHeads:
    model = seeded(TwoHeads())
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.export.export(
        model, (torch.zeros(2, FEATURES), torch.zeros(2, dtype=torch.int64)),
        dynamic_shapes=({0: batch}, {0: batch}))
    directory.mkdir(parents=True, exist_ok=True)
    torch.export.save(program, str(directory / "model.pt2"))
    return model


def build_safetensors(directory: Path, *, slow_delay_s: float | None = None,
                      load_delay_s: float | None = None) -> TinyMLP:
    from safetensors.torch import save_file

    model = seeded(TinyMLP(hidden=8))
    directory.mkdir(parents=True, exist_ok=True)
    save_file(model.state_dict(), str(directory / "model.safetensors"))
    config = {"hidden": 8}
    if slow_delay_s is not None:
        config["delay_s"] = slow_delay_s
    if load_delay_s is not None:
        config["load_delay_s"] = load_delay_s
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "signature.json").write_text(json.dumps(mlp_signature()))
    return model
