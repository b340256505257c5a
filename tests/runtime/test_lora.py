"""LoRA adapters on the builtin engine, through a real server process: each adapter is a model
name; greedy output equals peft's merged model; two adapters and the base at once, each
stream its own; load and unload through vLLM's endpoints; mismatched adapters refused with a
400 naming the field while the server keeps serving; the watched adapter config; metrics."""

from __future__ import annotations

import concurrent.futures
import json
import time

import httpx
import openai
import pytest

from tests.runtime.conftest import RuntimeServer
from tests.runtime.lora_adapters import build_adapter, edit_config, merged_greedy
from tests.runtime.tiny_llm import build_tiny_llm

PROMPTS = ["the quick brown fox", "hello world", "kubernetes schedules", "one two three"]
MAX_TOKENS = 16


@pytest.fixture(scope="module")
def tiny_dir(module_tmp):
    return build_tiny_llm(module_tmp / "tiny-llm")


@pytest.fixture(scope="module")
def adapters(module_tmp, tiny_dir):
    other_base = build_tiny_llm(module_tmp / "other-base", hidden_size=96, heads=4, kv_heads=2)
    a1 = build_adapter(tiny_dir, module_tmp / "a1", seed=1, r=4, targets=("q_proj", "v_proj"))
    return {
        "a1": a1,
        "a2": build_adapter(tiny_dir, module_tmp / "a2", seed=2, r=8,
                            targets=("o_proj", "down_proj", "q_proj")),
        "a3": build_adapter(tiny_dir, module_tmp / "a3", seed=3, r=2, targets=("k_proj",)),
        "other-base": build_adapter(other_base, module_tmp / "ob", seed=4),
        "rank-too-big": build_adapter(tiny_dir, module_tmp / "big", seed=5, r=32),
        "wrong-rank": edit_config(a1, module_tmp / "wrong-rank", r=8),
        "wrong-targets": edit_config(a1, module_tmp / "wrong-targets",
                                     target_modules=["c_attn"]),
    }


@pytest.fixture(scope="module")
def config_file(module_tmp):
    path = module_tmp / "adapters.json"
    path.write_text("[]")
    return path


@pytest.fixture(scope="module")
def server(module_tmp, tiny_dir, adapters, config_file):
    running = RuntimeServer(["--model-uri", f"file://{tiny_dir}", "--format", "transformers",
                             "--task", "text-generation", "--name", "tiny",
                             "--max-num-seqs", "8", "--max-model-len", "200",
                             "--max-loras", "4", "--max-lora-rank", "16",
                             "--adapters", f"a1={adapters['a1']}",
                             "--adapters-config", str(config_file)], module_tmp).start()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0,
                         timeout=60)


@pytest.fixture(scope="module")
def tokenizer(tiny_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_dir)


def expected_text(tiny_dir, adapter_dir, tokenizer, prompt: str) -> str:
    ids = merged_greedy(tiny_dir, adapter_dir, tokenizer(prompt)["input_ids"], MAX_TOKENS)
    if ids and ids[-1] == tokenizer.eos_token_id:
        ids = ids[:-1]
    return tokenizer.decode(ids, skip_special_tokens=True)


def complete(client, model: str, prompt: str) -> str:
    result = client.completions.create(model=model, prompt=prompt, max_tokens=MAX_TOKENS,
                                       temperature=0)
    assert result.model == model
    return result.choices[0].text


def stream(client, model: str, prompt: str) -> str:
    pieces = []
    for chunk in client.completions.create(model=model, prompt=prompt, max_tokens=MAX_TOKENS,
                                           temperature=0, stream=True):
        assert chunk.model == model
        pieces += [choice.text for choice in chunk.choices]
    return "".join(pieces)


def load(server, name, path) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/load_lora_adapter",
                      json={"lora_name": name, "lora_path": str(path)}, timeout=60)


def unload(server, name) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/unload_lora_adapter", json={"lora_name": name},
                      timeout=60)


def test_adapters_are_models(client):
    ids = {card.id for card in client.models.list().data}
    assert {"tiny", "a1"} <= ids
    assert client.models.retrieve("a1").id == "a1"


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_equals_peft_merged_model(client, tiny_dir, adapters, tokenizer, prompt):
    want = expected_text(tiny_dir, adapters["a1"], tokenizer, prompt)
    assert want != expected_text(tiny_dir, None, tokenizer, prompt)  # the adapter matters
    assert complete(client, "a1", prompt) == want
    assert complete(client, "tiny", prompt) == expected_text(tiny_dir, None, tokenizer, prompt)


def test_two_adapters_and_the_base_concurrently(server, client, tiny_dir, adapters, tokenizer):
    assert load(server, "a2", adapters["a2"]).status_code == 200
    try:
        jobs = [(model, prompt) for prompt in PROMPTS for model in ("tiny", "a1", "a2")] * 2
        dirs = {"tiny": None, "a1": adapters["a1"], "a2": adapters["a2"]}
        want = {(m, p): expected_text(tiny_dir, dirs[m], tokenizer, p) for m, p in set(jobs)}
        with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
            got = list(pool.map(lambda job: stream(client, *job), jobs))
        for job, text in zip(jobs, got):
            assert text == want[job], job
    finally:
        assert unload(server, "a2").status_code == 200


def test_load_and_unload_through_the_api(server, client, tiny_dir, adapters, tokenizer):
    prompt = PROMPTS[0]
    with pytest.raises(openai.NotFoundError):
        complete(client, "a3", prompt)
    response = load(server, "a3", adapters["a3"])
    assert response.status_code == 200 and "a3" in response.text
    assert "a3" in {card.id for card in client.models.list().data}
    assert complete(client, "a3", prompt) == expected_text(tiny_dir, adapters["a3"], tokenizer,
                                                           prompt)
    assert load(server, "a3", adapters["a3"]).status_code == 409
    assert unload(server, "a3").status_code == 200
    assert "a3" not in {card.id for card in client.models.list().data}
    with pytest.raises(openai.NotFoundError):
        complete(client, "a3", prompt)
    assert unload(server, "a3").status_code == 404
    # the same name again after an unload, and the base unchanged by it all
    assert load(server, "a3", adapters["a3"]).status_code == 200
    assert unload(server, "a3").status_code == 200
    assert complete(client, "tiny", prompt) == expected_text(tiny_dir, None, tokenizer, prompt)


@pytest.mark.parametrize(("adapter", "param"), [
    ("other-base", "base_model_name_or_path"),
    ("rank-too-big", "r"),
    ("wrong-rank", "r"),
    ("wrong-targets", "target_modules"),
])
def test_mismatched_adapter_refused_naming_the_field(server, client, adapters, adapter, param):
    response = load(server, "bad", adapters[adapter])
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
    assert "bad" not in {card.id for card in client.models.list().data}
    assert complete(client, "tiny", PROMPTS[1])  # still serving


@pytest.mark.parametrize(("body", "param"), [
    ({"lora_name": "tiny", "lora_path": "/nonexistent"}, "lora_name"),
    ({"lora_name": "Not A Name", "lora_path": "/nonexistent"}, "lora_name"),
    ({"lora_name": "x", "lora_path": "/nonexistent"}, "lora_path"),
    ({"lora_name": "x"}, "lora_path"),
])
def test_bad_load_requests(server, body, param):
    response = httpx.post(f"{server.url}/v1/load_lora_adapter", json=body, timeout=30)
    assert response.status_code == 400 and response.json()["error"]["param"] == param


def test_pickled_adapter_refused(server, adapters, module_tmp):
    pickled = module_tmp / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text(
        (adapters["a1"] / "adapter_config.json").read_text())
    (pickled / "adapter_model.bin").write_bytes(b"not read")
    response = load(server, "pickled", pickled)
    assert response.status_code == 400 and response.json()["error"]["param"] == "lora_path"
    assert "safetensors" in response.json()["error"]["message"]


def wait_for(predicate, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.2)


def test_watched_config_loads_and_unloads(server, client, config_file, adapters):
    def served() -> set[str]:
        return {card.id for card in client.models.list().data}

    config_file.write_text(json.dumps([{"name": "from-config",
                                        "uri": f"file://{adapters['a2']}"}]))
    wait_for(lambda: "from-config" in served())
    assert complete(client, "from-config", PROMPTS[2])
    config_file.write_text("[]")
    wait_for(lambda: "from-config" not in served())
    assert "a1" in served()  # a --adapters one is not the config's to unload


def test_lora_requests_info_metric(server):
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    lines = [line for line in text.splitlines() if line.startswith("vllm:lora_requests_info{")]
    assert len(lines) == 1 and 'max_lora="4"' in lines[0]
    assert 'running_lora_adapters=""' in lines[0]  # idle now
    assert any(line.startswith("kubemaas_lora_requests_info{") and 'model="tiny"' in line
               for line in text.splitlines())


@pytest.mark.parametrize("adapter", ["a1", "a2", "a3", "other-base", "rank-too-big",
                                     "wrong-rank", "wrong-targets"])
def test_the_vllm_check_without_peft_agrees_with_peft(tiny_dir, adapters, adapter, monkeypatch):
    """The vLLM image has no peft: VllmAdapters checks an adapter against the base's skeleton
    with the JSON config and its own target matching. It takes and refuses what the peft check
    does, with the same field named."""
    import sys

    from kubemaas_runtime.errors import RuntimeServeError
    from kubemaas_runtime.generation.adapters import VllmAdapters

    def outcome():
        try:
            files = VllmAdapters(None, tiny_dir, max_rank=16).prepare(adapter, adapters[adapter])
        except RuntimeServeError as exc:
            return "refused", exc.param
        return "taken", (files.rank, sorted(files.weights),
                         [tuple(t.shape) for pair in files.weights.values() for t in pair])

    with_peft = outcome()
    for module in [m for m in sys.modules if m == "peft" or m.startswith("peft.")]:
        monkeypatch.delitem(sys.modules, module)
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft: ImportError
    without = outcome()
    assert without == with_peft
    assert (with_peft[0] == "taken") == (adapter in ("a1", "a2", "a3")), with_peft
