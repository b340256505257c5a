"""The generation front without a server: OpenAI's parameters parsed and checked against an
engine's features, logprobs in OpenAI's shapes, vLLM's logprobs mapped, the admission of a
streamed answer, and the composition (no import cycle, no tensor Model for generation)."""

from __future__ import annotations

import ast
import asyncio
import gc
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from kubemaas_runtime.admission import Admission, AdmissionLimits, EventStream, StreamOutcome
from kubemaas_runtime.errors import ModelNotFound
from kubemaas_runtime.generation import openai_api as api
from kubemaas_runtime.metrics import create_metrics

RUNTIME = Path(__file__).resolve().parents[2] / "runtime" / "kubemaas_runtime"
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def chat(**fields) -> api.GenerationRequest:
    return api.parse_chat_request({**CHAT, **fields}, "m")


def completion(**fields) -> api.GenerationRequest:
    return api.parse_completion_request({"model": "m", "prompt": "x", **fields}, "m")


def test_resolve_model_is_400_when_missing_and_404_when_unknown():
    assert api.resolve_model("m", "m") == "m"
    with pytest.raises(api.InvalidParameter) as missing:
        api.resolve_model(None, "m")
    assert missing.value.param == "model"
    with pytest.raises(ModelNotFound):
        api.resolve_model("other", "m")


def test_optional_fields_parse_into_the_request_and_what_they_need():
    request = chat(n=3, top_k=5, presence_penalty=0.5, frequency_penalty=-1, logprobs=True,
                   top_logprobs=4, response_format={"type": "json_schema", "json_schema": {
                       "name": "x", "schema": {"type": "object"}}})
    assert (request.n, request.top_k, request.presence_penalty, request.frequency_penalty,
            request.logprobs) == (3, 5, 0.5, -1.0, 4)
    assert json.loads(request.json_schema) == {"type": "object"}
    assert set(request.needs) == {("top_k", "top_k"), ("penalties", "presence_penalty"),
                                  ("penalties", "frequency_penalty"), ("logprobs", "logprobs"),
                                  ("json_schema", "response_format")}
    plain = chat(top_k=-1, logprobs=False, presence_penalty=0,
                 response_format={"type": "text"})
    assert plain.needs == () and plain.top_k == 0 and plain.logprobs is None
    assert plain.json_schema is None and plain.n == 1
    assert json.loads(chat(response_format={"type": "json_object"}).json_schema) == {
        "type": "object"}
    assert completion(logprobs=0).logprobs == 0 and completion(logprobs=0).needs == (
        ("logprobs", "logprobs"),)


@pytest.mark.parametrize("fields, param", [
    ({"n": 0}, "n"), ({"n": api.MAX_N + 1}, "n"), ({"top_k": -2}, "top_k"),
    ({"top_k": 1.5}, "top_k"), ({"logprobs": 3}, "logprobs"), ({"top_logprobs": 2}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"presence_penalty": -2.5}, "presence_penalty"), ({"response_format": "json"}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format"),
    ({"tools": [{}]}, "tools"),
])
def test_bad_optional_fields_are_refused_naming_them(fields, param):
    with pytest.raises(api.InvalidParameter) as refused:
        chat(**fields)
    assert refused.value.param == param


def test_completions_logprobs_is_an_integer():
    for value in (True, -1, 21, "2"):
        with pytest.raises(api.InvalidParameter) as refused:
            completion(logprobs=value)
        assert refused.value.param == "logprobs"


def test_a_feature_the_engine_lacks_is_400_naming_the_field():
    request = chat(logprobs=True, top_k=3)
    api.check_features(request, frozenset({"logprobs", "top_k"}), "vllm")
    with pytest.raises(api.InvalidParameter) as refused:
        api.check_features(request, frozenset({"logprobs"}), "builtin")
    assert refused.value.param == "top_k" and "builtin" in refused.value.message
    api.check_features(chat(n=4, seed=1), frozenset(), "builtin")  # n is the front's own


def test_logprobs_in_openais_shapes():
    texts = {1: "He", 2: "llo", 3: "é"}
    entries = [(-0.1, ((1, -0.1), (2, -2.0))), (-0.5, ((3, -0.4), (2, -0.5)))]
    content = api.chat_logprobs([1, 2], entries, texts.__getitem__)["content"]
    assert content[0] == {"token": "He", "logprob": -0.1, "bytes": [72, 101], "top_logprobs": [
        {"token": "He", "logprob": -0.1, "bytes": [72, 101]},
        {"token": "llo", "logprob": -2.0, "bytes": [108, 108, 111]}]}
    assert content[1]["top_logprobs"][0]["bytes"] == [195, 169]
    legacy = api.completion_logprobs([1, 2], entries, texts.__getitem__, offset=5)
    assert legacy == {"tokens": ["He", "llo"], "token_logprobs": [-0.1, -0.5],
                      "top_logprobs": [{"He": -0.1, "llo": -2.0}, {"é": -0.4, "llo": -0.5}],
                      "text_offset": [5, 7]}


def test_vllms_logprobs_become_chunk_logprobs_ranked():
    from kubemaas_runtime.generation.vllm_engine import chunk_logprobs

    def lp(value, rank):
        return SimpleNamespace(logprob=value, rank=rank)
    # position 0: the chosen token 7 is rank 3, outside the top 2 (vLLM adds it)
    positions = [{5: lp(-0.2, 1), 6: lp(-1.0, 2), 7: lp(-3.0, 3)}, {8: lp(-0.01, 1)}]
    assert chunk_logprobs((7, 8), positions, 2) == (
        (-3.0, ((5, -0.2), (6, -1.0))), (-0.01, ((8, -0.01),)))
    assert chunk_logprobs((7,), positions[:1], 0) == ((-3.0, ()),)
    assert chunk_logprobs((7,), positions[:1], None) is None


# -- admission of a streamed answer ---------------------------------------------------------
def admission() -> Admission:
    metrics = create_metrics().bind("m", "default")
    return Admission(AdmissionLimits(max_inflight=2, max_request_bytes=1 << 20,
                                     max_buffered_bytes=1 << 20, body_timeout_s=5), metrics)


def run_stream_route(send_fails: bool = False, call: bool = True):
    gate = admission()
    ended: list[int] = []

    async def events(outcome):
        yield b"data: 1\n\n"
        outcome.fail(500)
        yield b"data: 2\n\n"

    async def handler(request, ticket):
        ticket.hold_slot()
        outcome = StreamOutcome()
        outcome.on_end(ended.append)
        return EventStream(events(outcome), outcome)

    route = gate.endpoint(handler)

    async def main():
        response = await route(SimpleNamespace())
        held = gate.inflight
        if call:
            async def receive():
                await asyncio.sleep(10)
                return {"type": "http.disconnect"}

            async def send(message):
                if send_fails and message.get("body"):
                    raise OSError("client gone")
            scope = {"type": "http", "asgi": {"spec_version": "2.4"}}
            with pytest.raises(Exception) if send_fails else _nothing():
                await response(scope, receive, send)
        del response
        gc.collect()
        return held

    held = asyncio.run(main())
    return held, gate, ended


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("send_fails, call", [(False, True), (True, True), (False, False)],
                         ids=["sent", "client-gone", "never-sent"])
def test_a_stream_holds_its_slot_until_it_ends_and_is_counted_once(send_fails, call):
    held, gate, ended = run_stream_route(send_fails, call)
    assert held == 1 and gate.inflight == 0
    requests = gate._metrics.requests._value.get()
    assert requests == 1 and len(ended) == 1
    assert ended == [500 if call and not send_fails else 200]


# -- the composition ------------------------------------------------------------------------
def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def test_nothing_imports_the_server_module_back():
    for path in RUNTIME.rglob("*.py"):
        if path.name in ("server.py", "serve.py"):
            continue
        modules = imported_modules(path)
        assert "kubemaas_runtime.server" not in modules, path
        assert not any(m.endswith("_not_ready_reason") for m in modules), path


def test_generation_models_are_not_tensor_models():
    from kubemaas_runtime.generation.model import GenerativeBase, GenerativeModel
    from kubemaas_runtime.generation.vllm_engine import VllmGenerativeModel
    from kubemaas_runtime.models.base import Model

    for cls in (GenerativeModel, VllmGenerativeModel):
        assert issubclass(cls, GenerativeBase) and not issubclass(cls, Model)
        assert not hasattr(cls, "predict") and not hasattr(cls, "validate")
