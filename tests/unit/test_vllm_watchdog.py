"""The vLLM engine's watchdog without vLLM: an `AsyncLLM` stand-in that turns `errored` (its
engine core died) with a request waiting on outputs that never come: the stream ends with an
error, the server is told (EngineDead) once, and new requests are refused."""

from __future__ import annotations

import asyncio
import sys
import types

import pytest
from kubemaas_runtime.errors import ModelNotReady
from kubemaas_runtime.generation import vllm_engine
from kubemaas_runtime.generation.sampling import SamplingParams
from kubemaas_runtime.generation.vllm_engine import EngineDead, VllmEngine, VllmSettings


class DyingLLM:
    """generate() waits forever, as it does for a request whose engine core is gone."""

    def __init__(self) -> None:
        self.errored = False
        self.shut_down = False

    async def generate(self, *args, **kwargs):
        await asyncio.Event().wait()
        yield  # pragma: no cover - never reached

    def shutdown(self) -> None:
        self.shut_down = True


def test_engine_core_death_fails_streams_and_reports_once(monkeypatch):
    monkeypatch.setattr(vllm_engine, "to_vllm_params", lambda params: params)
    inputs = types.ModuleType("vllm.inputs")
    inputs.TokensPrompt = dict  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "vllm", types.ModuleType("vllm"))
    monkeypatch.setitem(sys.modules, "vllm.inputs", inputs)
    fatal: list[EngineDead] = []

    async def scenario():
        llm = DyingLLM()
        engine = VllmEngine(llm, VllmSettings())
        engine.on_fatal = fatal.append
        engine._loop = asyncio.get_running_loop()
        engine.start()
        stream = engine.submit([1, 2, 3], SamplingParams(max_tokens=8))
        await asyncio.sleep(0.1)
        llm.errored = True
        chunks = [c async for c in stream.chunks()]  # a hang here is the bug
        with pytest.raises(ModelNotReady):
            engine.submit([1], SamplingParams(max_tokens=1))
        engine.stop(timeout=1)
        return chunks, llm

    chunks, llm = asyncio.run(asyncio.wait_for(scenario(), 30))
    assert [c.finish_reason for c in chunks] == ["error"]
    assert "engine core died" in chunks[0].error
    assert len(fatal) == 1 and isinstance(fatal[0], EngineDead)
    assert llm.shut_down
