"""The one interface the generation routes use, whichever engine runs the model.

Both engines implement it: the builtin PyTorch engine (`engine.GenerationEngine`) and vLLM in
this process (`vllm_engine.VllmEngine`); tests/unit/test_engine_api.py pins that they do. The
routes hold an `Engine` and never reach past it:

- `start()` / `stop()` around serving, `alive` while it can take work;
- `submit(prompt_ids, params)` queues one sequence of already tokenized prompt ids (the front
  tokenizes, so both engines see the same ids) and returns its `Stream` at once, raising
  `Overloaded` (503) when the engine's queue is full and `ModelNotReady` when it is not running;
- `features`: the optional sampling features this engine honours, a subset of `FEATURES`
  (`top_k`, `penalties`, `logprobs`, `json_schema`); the front refuses a request that
  needs one the engine lacks with a 400 naming the field, never ignores it;
- `Stream.chunks()` yields `Chunk`s; the last one has a finish_reason (`stop`, `length`, or
  `abort` / `error` with `error` set); `Stream.cancel()` drops the sequence at its next token
  boundary and frees its slot (a no-op once it finished).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol, runtime_checkable

from kubemaas_runtime.generation.engine import Chunk
from kubemaas_runtime.generation.sampling import SamplingParams

__all__ = ["FEATURES", "Chunk", "Engine", "SamplingParams", "Stream"]

# `n` is not among them: the front runs n sequences itself, on either engine (routes.py).
FEATURES = frozenset({"top_k", "penalties", "logprobs", "json_schema"})


@runtime_checkable
class Stream(Protocol):
    def chunks(self) -> AsyncIterator[Chunk]: ...

    def cancel(self) -> None: ...


@runtime_checkable
class Engine(Protocol):
    def start(self) -> None: ...

    def stop(self, timeout: float = ...) -> None: ...

    @property
    def alive(self) -> bool: ...

    @property
    def features(self) -> frozenset[str]: ...

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> Stream: ...
