"""LoRA adapters of a text-generation model (docs/runtime.md "LoRA adapters").

- `read_adapter_dir`: a PEFT adapter directory (adapter_config.json + adapter_model.safetensors,
  never a pickle) read and checked against the base model's layers: rank, target modules and
  every tensor's shape. A mismatch is a 400 naming the field (`r`, `target_modules`,
  `base_model_name_or_path` for a tensor of another base's shape, ...).
- `AdapterRegistry`: the served names (each adapter is a model name in /v1/models), load and
  unload (vLLM's `/v1/load_lora_adapter` shape, adapter_routes.py), and the running/waiting
  gauge in vLLM's `vllm:lora_requests_info` shape. It drives one backend per engine:
- `PeftAdapters` (builtin engine): the adapters are injected with peft into the one base model;
  a step that mixes sequences of several adapters runs as ONE forward, peft's mixed-batch path
  (`adapter_names`) applying each token's adapter. Module changes run on the engine thread
  between steps (`GenerationEngine.call_between_steps`), never under a running forward.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol, cast

import torch

from kubemaas_runtime.errors import InvalidInput, ModelNotFound

log = logging.getLogger("kubemaas_runtime")

BASE = "__base__"  # peft's name for "no adapter" in a mixed batch
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLED_WEIGHTS = "adapter_model.bin"
NAME_PATTERN = re.compile(r"[a-z0-9]([-a-z0-9.]{0,61}[a-z0-9])?")
MAX_CONFIG_BYTES = 1 << 20
_KEY = re.compile(r"base_model\.model\.(?P<module>.+)\.lora_(?P<kind>[AB])\.weight")


class AdapterRefused(InvalidInput):
    """A 400 whose OpenAI error names the offending field (`param`)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


class AdapterConflict(InvalidInput):
    status_code = 409

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


@dataclasses.dataclass(frozen=True)
class AdapterFiles:
    """An adapter directory, read and checked: its peft config and its tensors, keyed by the
    base module's name (`model.layers.0.self_attn.q_proj`) -> (lora_A, lora_B)."""

    path: Path
    config: Any  # peft.LoraConfig
    rank: int
    target_modules: tuple[str, ...]
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]


def check_adapter_name(name: Any, base_name: str, param: str = "lora_name") -> str:
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise AdapterRefused(param, f"'{param}' must be a DNS-like name (lower-case letters, "
                                    "digits, '-' and '.', at most 63 characters)")
    if name == base_name:
        raise AdapterRefused(param, f"'{param}' {name!r} is the base model's own name")
    return name


def read_config(path: Path) -> dict[str, Any]:
    if not path.is_dir():
        raise AdapterRefused("lora_path", f"'lora_path' {path} is not a directory")
    config_file = path / CONFIG_FILE
    if not config_file.is_file() or config_file.stat().st_size > MAX_CONFIG_BYTES:
        raise AdapterRefused("lora_path", f"'lora_path' {path} has no {CONFIG_FILE} (of at most "
                                          f"{MAX_CONFIG_BYTES} bytes)")
    try:
        doc = json.loads(config_file.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise AdapterRefused("lora_path", f"{config_file} is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise AdapterRefused("lora_path", f"{config_file} must hold a JSON object")
    if str(doc.get("peft_type", "")).upper() != "LORA":
        raise AdapterRefused("peft_type", f"'peft_type' must be LORA, got {doc.get('peft_type')!r}")
    for flag in ("use_dora", "use_rslora"):
        if doc.get(flag):
            raise AdapterRefused(flag, f"'{flag}' adapters are not supported (plain LoRA only)")
    if doc.get("modules_to_save"):
        raise AdapterRefused("modules_to_save", "'modules_to_save' replaces whole layers, which "
                                                "one batch cannot share: not supported")
    if doc.get("rank_pattern") or doc.get("alpha_pattern"):
        raise AdapterRefused("rank_pattern", "per-module 'rank_pattern'/'alpha_pattern' is not "
                                             "supported: one rank per adapter")
    return doc


def linear_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The base model's linear layers by module name (a peft-wrapped one by its own name)."""
    wrapped: tuple[type, ...] = ()
    try:
        from peft.tuners.lora import LoraLayer
        wrapped = (LoraLayer,)
    except ImportError:  # the vLLM image has no peft: nothing in its skeleton is wrapped
        pass

    found: dict[str, torch.nn.Module] = {}
    for name, module in model.named_modules():
        if wrapped and isinstance(module, wrapped):
            found[name] = cast(Any, module).get_base_layer()
        elif isinstance(module, torch.nn.Linear) and not name.endswith(
                (".base_layer", ".lora_A", ".lora_B")) and ".lora_" not in name:
            found[name] = module
    return found


def _lora_config(doc: dict[str, Any], path: Path) -> tuple[Any, Any]:
    """(peft's LoraConfig, or the JSON document without peft; name -> targeted?)."""
    try:
        from peft import LoraConfig
        from peft.tuners.tuners_utils import check_target_module_exists
    except ImportError:
        for field in ("layers_to_transform", "layers_pattern", "exclude_modules"):
            if doc.get(field):
                raise AdapterRefused(field, f"'{field}' is not supported by this engine's "
                                            "adapter check") from None
        targets = doc["target_modules"]
        if isinstance(targets, str):  # peft: a string is a regex over the whole name
            pattern = re.compile(targets)
            return doc, lambda name: pattern.fullmatch(name) is not None
        return doc, lambda name: any(name == t or name.endswith("." + t) for t in targets)
    known = {k: v for k, v in doc.items() if k in LoraConfig.__dataclass_fields__}
    try:
        config = LoraConfig(**{**known, "inference_mode": True, "init_lora_weights": True})
    except (TypeError, ValueError) as exc:
        raise AdapterRefused("lora_path", f"{path / CONFIG_FILE} is not a LoRA config: {exc}"
                             ) from None
    return config, lambda name: check_target_module_exists(config, name)


def read_adapter_dir(path: Path, model: torch.nn.Module, max_rank: int) -> AdapterFiles:
    """Read and check one adapter directory against the base `model` (AdapterRefused naming
    the field on any mismatch). Tensors are read with safetensors only. Without peft (the
    vLLM engine's image, where vLLM applies the adapter) the config stays the JSON document
    and the targets are matched as peft matches a list or a regex."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    doc = read_config(path)
    rank = doc.get("r")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= max_rank:
        raise AdapterRefused("r", f"'r' (the LoRA rank) must be an integer in [1, {max_rank}] "
                                  f"(--max-lora-rank), got {rank!r}")
    targets = doc.get("target_modules")
    if isinstance(targets, str):
        targets = [targets]
    if not isinstance(targets, list) or not targets or not all(
            isinstance(t, str) for t in targets):
        raise AdapterRefused("target_modules", "'target_modules' must be a non-empty list of "
                                               "module names")
    config, matches = _lora_config(doc, path)
    layers = linear_layers(model)
    targeted = {name for name in layers if matches(name)}
    suffixes = {name.rsplit(".", 1)[-1] for name in layers}
    missing = [t for t in targets if t not in suffixes and not any(
        name.endswith("." + t) for name in layers)]
    if missing or not targeted:
        raise AdapterRefused("target_modules", f"'target_modules' {missing or targets} name no "
                                               f"linear layer of the base model (it has "
                                               f"{sorted(suffixes)})")
    weights_file = path / WEIGHTS_FILE
    if not weights_file.is_file():
        pickled = " (adapter_model.bin is a pickle: convert it to safetensors)" if (
            path / PICKLED_WEIGHTS).exists() else ""
        raise AdapterRefused("lora_path", f"'lora_path' {path} has no {WEIGHTS_FILE}{pickled}")
    try:
        tensors = load_file(str(weights_file), device="cpu")
    except (SafetensorError, OSError) as exc:
        raise AdapterRefused("lora_path", f"{weights_file} is not a safetensors file: {exc}"
                             ) from None
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY.fullmatch(key)
        if match is None or match["module"] not in targeted:
            raise AdapterRefused("target_modules", f"tensor {key} is for no targeted linear layer "
                                                   "of the base model (a different base model?)")
        pairs.setdefault(match["module"], {})[match["kind"]] = tensor
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for module in sorted(targeted):
        pair = pairs.get(module, {})
        if "A" not in pair or "B" not in pair:
            raise AdapterRefused("target_modules", f"no lora_A/lora_B weights for {module}, "
                                                   "which target_modules names")
        base = layers[module]
        a, b = pair["A"], pair["B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != rank or b.shape[1] != rank:
            raise AdapterRefused("r", f"'r' is {rank} but {module}'s lora_A is "
                                      f"{tuple(a.shape)} and lora_B {tuple(b.shape)}")
        if a.shape[1] != base.in_features or b.shape[0] != base.out_features:
            raise AdapterRefused("base_model_name_or_path", (
                f"{module} of the base model maps {base.in_features} -> {base.out_features} "
                f"features, the adapter's {a.shape[1]} -> {b.shape[0]}: it was trained on a "
                f"different base model ({doc.get('base_model_name_or_path')!r})"))
        weights[module] = (a, b)
    return AdapterFiles(path, config, rank, tuple(targets), weights)


class AdapterBackend(Protocol):
    """One engine's adapters; every method blocks and may run on any thread but the engine's."""

    def prepare(self, name: str, path: Path) -> Any: ...  # read and check (AdapterRefused)

    def add(self, name: str, prepared: Any, adapter_id: int) -> None: ...

    def remove(self, name: str, adapter_id: int) -> None: ...


@dataclasses.dataclass(frozen=True)
class LoadedAdapter:
    name: str
    path: str
    rank: int
    id: int  # vLLM's lora_int_id; unique per load


class AdapterRegistry:
    """Which adapters are served, under which names; shared by the routes (through a worker
    thread: loading blocks), the config watcher and the engines' gauges. Thread-safe."""

    def __init__(self, backend: AdapterBackend, base_name: str, *, max_loras: int,
                 metrics=None, variant: str = "default") -> None:
        self.backend = backend
        self.base_name = base_name
        self.max_loras = max_loras
        self.metrics = metrics  # RuntimeMetrics or None
        self.variant = variant
        self.loaded: dict[str, LoadedAdapter] = {}
        self._next_id = 1
        self._busy: set[str] = set()  # names being loaded or unloaded
        self._last_info: tuple[str, str] | None = None
        self._lock = threading.Lock()
        self.publish((), ())

    def names(self) -> list[str]:
        return sorted(self.loaded)

    def resolve(self, model: str) -> str | None:
        """The adapter a request's `model` names (None: the base model); 404 otherwise."""
        if model == self.base_name:
            return None
        if model in self.loaded:
            return model
        raise ModelNotFound(model)

    def load(self, name: Any, path: Any) -> LoadedAdapter:
        name = check_adapter_name(name, self.base_name)
        if not isinstance(path, str) or not path:
            raise AdapterRefused("lora_path", "'lora_path' must be a directory path")
        with self._lock:
            if name in self.loaded or name in self._busy:
                raise AdapterConflict("lora_name", f"adapter {name!r} is already loaded (unload "
                                                   "it first to replace it)")
            if len(self.loaded) + len(self._busy) >= self.max_loras:
                raise AdapterRefused("lora_name", f"{self.max_loras} adapters are loaded, the "
                                                  "most this server takes (--max-loras)")
            self._busy.add(name)
            adapter_id = self._next_id
            self._next_id += 1
        try:
            prepared = self.backend.prepare(name, Path(path))
            self.backend.add(name, prepared, adapter_id)
            adapter = LoadedAdapter(name, path, getattr(prepared, "rank", 0), adapter_id)
            with self._lock:
                self.loaded[name] = adapter
        finally:
            with self._lock:
                self._busy.discard(name)
        log.info("adapter %s loaded from %s", name, path)
        return adapter

    def unload(self, name: Any) -> None:
        with self._lock:
            if not isinstance(name, str) or name not in self.loaded:
                raise ModelNotFound(str(name))
            adapter = self.loaded.pop(name)  # new requests get 404 at once
            self._busy.add(name)
        try:
            self.backend.remove(name, adapter.id)  # after its running sequences finish
        finally:
            with self._lock:
                self._busy.discard(name)
        log.info("adapter %s unloaded", name)

    def lora_id(self, name: str | None) -> int | None:
        adapter = self.loaded.get(name) if name is not None else None
        return adapter.id if adapter is not None else None

    def publish(self, running: tuple[str, ...] | list[str], waiting: tuple[str, ...] | list[str]
                ) -> None:
        """The engine's per-step report: the adapters of running and of waiting sequences
        (any thread). One series of vLLM's shape: the labels say which, the value when."""
        if self.metrics is None:
            return
        labels = (",".join(sorted(set(running))), ",".join(sorted(set(waiting))))
        if labels == self._last_info:
            return
        self._last_info = labels
        now = time.time()
        for gauge, prefix in ((self.metrics.vllm_lora_requests_info, ()),
                              (self.metrics.lora_requests_info, (self.base_name, self.variant))):
            gauge.clear()
            gauge.labels(*prefix, *labels, str(self.max_loras)).set(now)


class PeftAdapters:
    """The builtin engine's adapters: peft layers in the engine's model, applied per token.

    The engine flattens a step's tokens into one row ([1, tokens, hidden]); peft's mixed batch
    picks adapters along dim 0, so each LoRA layer's input is seen as [tokens, 1, hidden] for
    that call and the output turned back: every token gets its own sequence's adapter."""

    def __init__(self, model: torch.nn.Module, *, max_rank: int,
                 run: Callable[[Callable[[], bool]], Any]) -> None:
        self.model = model
        self.max_rank = max_rank
        self._run = run  # runs a change between engine steps: engine.call_between_steps
        self._hooked: set[int] = set()
        self._rows: list[str] | None = None  # this step's adapter per token
        self.in_use: Callable[[str], bool] = lambda name: False  # set by the engine

    def prepare(self, name: str, path: Path) -> AdapterFiles:
        return read_adapter_dir(path, self.model, self.max_rank)

    def add(self, name: str, files: AdapterFiles, adapter_id: int) -> None:
        def change() -> bool:
            self._inject(name, files)
            return True
        self._run(change).result()

    def remove(self, name: str, adapter_id: int) -> None:
        def change() -> bool:
            if self.in_use(name):
                return False  # sequences still decode with it: try again after the next step
            self._delete(name)
            return True
        self._run(change).result()

    def _inject(self, name: str, files: AdapterFiles) -> None:
        from peft import inject_adapter_in_model
        from peft.tuners.lora import LoraLayer

        # the engine thread runs in inference mode, whose tensors could never join a module
        with torch.inference_mode(False), torch.no_grad():
            inject_adapter_in_model(files.config, self.model, adapter_name=name)
            for module_name, (a, b) in files.weights.items():
                layer = self.model.get_submodule(module_name)
                weight = layer.get_base_layer().weight
                dtype = weight.dtype if weight.is_floating_point() else torch.float32
                for pair, tensor in ((layer.lora_A[name], a), (layer.lora_B[name], b)):
                    pair.weight = torch.nn.Parameter(
                        tensor.to(weight.device, dtype, copy=True), requires_grad=False)
        for module in self.model.modules():
            if isinstance(module, torch.nn.Module) and isinstance(module, LoraLayer) \
                    and id(module) not in self._hooked:
                module = cast(torch.nn.Module, module)
                module.register_forward_pre_hook(self._pre_hook, with_kwargs=True)
                module.register_forward_hook(self._post_hook)
                self._hooked.add(id(module))
        self.model.eval()

    def _delete(self, name: str) -> None:
        from peft.tuners.lora import LoraLayer

        for module in self.model.modules():
            if isinstance(module, LoraLayer) and name in module.lora_A:
                module.delete_adapter(name)
        config = getattr(self.model, "peft_config", None)
        if isinstance(config, dict):
            config.pop(name, None)

    @contextlib.contextmanager
    def step(self, rows: list[str | None]) -> Iterator[None]:
        """Around one engine forward: the adapter of each of its tokens (None: the base)."""
        self._rows = [row or BASE for row in rows] if any(rows) else None
        try:
            yield
        finally:
            self._rows = None

    def _pre_hook(self, module, args, kwargs):
        x = args[0]
        rows = self._rows
        if rows is None or x.dim() != 3 or x.shape[0] != 1 or x.shape[1] != len(rows):
            kwargs["adapter_names"] = [BASE] * x.shape[0]
            return args, kwargs
        kwargs["adapter_names"] = rows
        return (x.reshape(x.shape[1], 1, x.shape[2]), *args[1:]), kwargs

    def _post_hook(self, module, args, output):
        if self._rows is not None and output.dim() == 3 and output.shape[1] == 1 and \
                output.shape[0] == len(self._rows) and args[0].shape[1] == 1:
            return output.reshape(1, output.shape[0], output.shape[2])
        return None


class VllmAdapters:
    """The vLLM engine's adapters: vLLM's own LoRA (`enable_lora`, `LoRARequest`). The same
    checks as the builtin engine's, against the base model's layers built on the meta device
    from its config.json (no weights), then each request carries its adapter's LoRARequest and
    vLLM loads it into a slot (--max-loras) on first use; unloading is vLLM's `remove_lora`."""

    def __init__(self, engine, model_path: Path, *, max_rank: int) -> None:
        self.engine = engine  # VllmEngine
        self.model_path = model_path
        self.max_rank = max_rank
        self._skeleton: torch.nn.Module | None = None
        self._lock = threading.Lock()

    def _layers_model(self) -> torch.nn.Module:
        with self._lock:
            if self._skeleton is None:
                from accelerate import init_empty_weights
                from transformers import AutoConfig, AutoModelForCausalLM

                config = AutoConfig.from_pretrained(str(self.model_path), local_files_only=True,
                                                    trust_remote_code=False)
                with init_empty_weights():
                    self._skeleton = AutoModelForCausalLM.from_config(config)
            return self._skeleton

    def prepare(self, name: str, path: Path) -> AdapterFiles:
        return read_adapter_dir(path, self._layers_model(), self.max_rank)

    def add(self, name: str, files: AdapterFiles, adapter_id: int) -> None:
        from vllm.lora.request import LoRARequest

        self.engine.lora_requests[name] = LoRARequest(name, adapter_id, str(files.path))

    def remove(self, name: str, adapter_id: int) -> None:
        request = self.engine.lora_requests.pop(name, None)
        loop = self.engine._loop
        if request is not None and loop is not None and not loop.is_closed():
            import asyncio

            asyncio.run_coroutine_threadsafe(self.engine.llm.remove_lora(adapter_id), loop
                                             ).result(60)
