"""The OpenAI API and v2 generate on a real server process, through the official `openai`
client, with a tiny random causal LM built here: greedy output against transformers'
`generate`, streams, usage, concurrency, and every error."""

from __future__ import annotations

import concurrent.futures

import httpx
import openai
import pytest
import torch

from tests.runtime.conftest import RuntimeServer
from tests.runtime.tiny_llm import build_tiny_llm

PROMPTS = ["the quick brown fox", "hello world", "kubernetes schedules", "one two three",
           "def add(a, b):", "Les modèles"]


@pytest.fixture(scope="module")
def tiny_dir(module_tmp):
    return build_tiny_llm(module_tmp / "tiny-llm")


@pytest.fixture(scope="module")
def reference(tiny_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    return model, AutoTokenizer.from_pretrained(tiny_dir)


@pytest.fixture(scope="module")
def server(module_tmp, tiny_dir):
    running = RuntimeServer(["--model-uri", f"file://{tiny_dir}", "--format", "transformers",
                             "--task", "text-generation", "--name", "tiny",
                             "--max-num-seqs", "8", "--max-model-len", "200"],
                            module_tmp).start()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0,
                         timeout=60)


def generate_ids(reference, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    model, tokenizer = reference
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(
            1, len(prompt_ids), dtype=torch.long), max_new_tokens=max_new_tokens,
            do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return out[0, len(prompt_ids):].tolist()


def expected(reference, prompt_ids, max_tokens):
    """(text, completion tokens, finish_reason) as generate() gives them."""
    _model, tokenizer = reference
    ids = generate_ids(reference, prompt_ids, max_tokens)
    eos = tokenizer.eos_token_id
    finish = "stop" if ids and ids[-1] == eos else "length"
    text_ids = ids[:-1] if finish == "stop" else ids
    return tokenizer.decode(text_ids, skip_special_tokens=True), len(ids), finish


def test_models_lists_the_served_model(client):
    (card,) = client.models.list().data
    assert card.id == "tiny" and card.object == "model"
    assert client.models.retrieve("tiny").id == "tiny"


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_completion_equals_generate(client, reference, prompt):
    prompt_ids = reference[1](prompt)["input_ids"]
    text, tokens, finish = expected(reference, prompt_ids, 24)
    result = client.completions.create(model="tiny", prompt=prompt, max_tokens=24,
                                       temperature=0)
    assert result.choices[0].text == text
    assert result.choices[0].finish_reason == finish
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (
        len(prompt_ids), tokens)
    assert result.usage.total_tokens == len(prompt_ids) + tokens


def test_chat_applies_the_template_and_equals_generate(client, reference):
    messages = [{"role": "system", "content": "be brief"},
                {"role": "user", "content": "hello world"}]
    rendered = reference[1].apply_chat_template(messages, add_generation_prompt=True,
                                                tokenize=False)
    prompt_ids = reference[1](rendered, add_special_tokens=False)["input_ids"]
    text, tokens, finish = expected(reference, prompt_ids, 16)
    result = client.chat.completions.create(model="tiny", messages=messages, max_tokens=16,
                                            temperature=0)
    assert result.object == "chat.completion"
    assert result.choices[0].message.role == "assistant"
    assert result.choices[0].message.content == text
    assert result.choices[0].finish_reason == finish
    assert result.usage.prompt_tokens == len(prompt_ids)
    assert result.usage.completion_tokens == tokens


@pytest.mark.parametrize("chat", [True, False])
def test_stream_concatenates_to_the_non_streamed_text(client, chat):
    kwargs = {"model": "tiny", "max_tokens": 20, "temperature": 0}
    if chat:
        kwargs["messages"] = [{"role": "user", "content": "one two three"}]
        create = client.chat.completions.create
    else:
        kwargs["prompt"] = "one two three"
        create = client.completions.create
    whole = create(**kwargs)
    chunks = list(create(**kwargs, stream=True, stream_options={"include_usage": True}))
    if chat:
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert chunks[0].choices[0].delta.role == "assistant"
        assert text == whole.choices[0].message.content
    else:
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        assert text == whole.choices[0].text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == whole.choices[0].finish_reason and set(finishes[:-1]) == {None}
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == (
        whole.usage.completion_tokens)
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_sse_frames_end_with_done(server):
    with httpx.stream("POST", f"{server.url}/v1/completions", timeout=30, json={
            "model": "tiny", "prompt": "hello", "max_tokens": 3, "stream": True}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]" and lines.count("data: [DONE]") == 1


def test_sixteen_concurrent_streams_each_equal_their_solo_answer(client):
    prompts = [(PROMPTS[i % len(PROMPTS)] + " " * (i // len(PROMPTS)), 8 + 3 * (i % 5))
               for i in range(16)]

    def solo(prompt, max_tokens):
        return client.completions.create(model="tiny", prompt=prompt, max_tokens=max_tokens,
                                         temperature=0).choices[0].text

    def streamed(prompt, max_tokens):
        return "".join(c.choices[0].text for c in client.completions.create(
            model="tiny", prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True))

    alone = [solo(p, n) for p, n in prompts]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda pn: streamed(*pn), prompts))
    assert together == alone


def test_seeded_sampling_repeats_and_stop_strings_end_the_text(client):
    def sample(seed):
        return client.completions.create(model="tiny", prompt="hello", max_tokens=16,
                                         temperature=1.0, top_p=0.9, seed=seed).choices[0].text
    assert sample(3) == sample(3)
    full = client.completions.create(model="tiny", prompt="the quick", max_tokens=30,
                                     temperature=0).choices[0].text
    stop = full[len(full) // 2: len(full) // 2 + 2]
    assert stop and len(full) > 4
    cut = client.completions.create(model="tiny", prompt="the quick", max_tokens=30,
                                    temperature=0, stop=[stop]).choices[0]
    assert cut.finish_reason == "stop" and cut.text == full[:full.index(stop)]


def test_v2_generate_and_generate_stream(server, client):
    expected_text = client.completions.create(model="tiny", prompt="hello world",
                                              max_tokens=6, temperature=0).choices[0].text
    body = {"text_input": "hello world", "parameters": {"max_tokens": 6, "temperature": 0}}
    answer = httpx.post(f"{server.url}/v2/models/tiny/generate", json=body, timeout=30).json()
    assert answer["model_name"] == "tiny" and answer["text_output"] == expected_text
    with httpx.stream("POST", f"{server.url}/v2/models/tiny/generate_stream", json=body,
                      timeout=30) as response:
        import json

        events = [json.loads(line[6:]) for line in response.iter_lines() if line]
    assert "".join(e["text_output"] for e in events) == expected_text
    assert events[-1]["finish_reason"] in ("stop", "length")
    missing = httpx.post(f"{server.url}/v2/models/nope/generate", json=body, timeout=30)
    assert missing.status_code == 404 and "nope" in missing.json()["error"]


def test_infer_points_at_the_generation_routes(server):
    response = httpx.post(f"{server.url}/v2/models/tiny/infer", timeout=30, json={
        "inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [1], "data": ["x"]}]})
    assert response.status_code == 400 and "/v1/chat/completions" in response.json()["error"]


def openai_error(server, path, body, status):
    response = httpx.post(f"{server.url}{path}", content=body if isinstance(body, bytes)
                          else None, json=None if isinstance(body, bytes) else body, timeout=30)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error, response


CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize("field, value", [
    ("max_tokens", 0), ("max_completion_tokens", -1), ("temperature", 2.5),
    ("temperature", -0.1), ("top_p", 0), ("top_p", 1.5), ("n", 0), ("n", 17), ("stop", 7),
    ("seed", "x"), ("stream", "yes"), ("logprobs", "yes"), ("top_logprobs", 21),
    ("presence_penalty", 2.5), ("frequency_penalty", -3), ("top_k", 0.5),
])
def test_bad_parameters_are_400_naming_them(server, field, value):
    error, _ = openai_error(server, "/v1/chat/completions", {**CHAT, field: value}, 400)
    assert error["param"] == field and field in error["message"]
    assert error["type"] == "invalid_request_error"


def test_malformed_bodies_and_messages(server):
    error, _ = openai_error(server, "/v1/chat/completions", b"{not json", 400)
    assert "JSON" in error["message"]
    openai_error(server, "/v1/chat/completions", b"[1, 2]", 400)
    error, _ = openai_error(server, "/v1/chat/completions", {"model": "tiny"}, 400)
    assert error["param"] == "messages"
    error, _ = openai_error(server, "/v1/chat/completions", {**CHAT, "messages": [
        {"role": "wizard", "content": "x"}]}, 400)
    assert error["param"] == "messages[0].role"
    error, _ = openai_error(server, "/v1/chat/completions", {**CHAT, "messages": [
        {"role": "user", "content": "x"}] * 5000}, 400)
    assert "5000" in error["message"]
    error, _ = openai_error(server, "/v1/completions", {"model": "tiny", "prompt": ["a", "b"]},
                            400)
    assert error["param"] == "prompt"


def test_unknown_model_is_404_through_the_client(client):
    with pytest.raises(openai.NotFoundError) as exc:
        client.chat.completions.create(model="gpt-4", messages=CHAT["messages"])
    assert exc.value.body["code"] == "model_not_found"


def test_prompt_longer_than_the_context_is_400_with_both_lengths(server, client, reference):
    prompt = "one two three four five six seven eight " * 30
    length = len(reference[1](prompt)["input_ids"])
    assert length > 200
    error, _ = openai_error(server, "/v1/completions", {"model": "tiny", "prompt": prompt}, 400)
    assert str(length) in error["message"] and "200" in error["message"]
    assert error["code"] == "context_length_exceeded"
    short = "hello " * 10
    error, _ = openai_error(server, "/v1/completions", {
        "model": "tiny", "prompt": short, "max_tokens": 195}, 400)
    assert error["param"] == "max_tokens" and "200" in error["message"]
    huge = "x" * 200 * 40  # refused before tokenizing
    error, _ = openai_error(server, "/v1/completions", {"model": "tiny", "prompt": huge}, 400)
    assert "characters" in error["message"]
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt=prompt, max_tokens=4)


def test_oversized_body_is_413(server):
    body = b'{"model": "tiny", "prompt": "' + b"a" * (9 * 1024 * 1024) + b'"}'
    error, _ = openai_error(server, "/v1/completions", body, 413)
    assert error["code"] == "request_too_large"


def test_generation_metrics_count_tokens(server, client):
    def sample(name):
        return server.metric(name, 'model="tiny"')
    before = {n: sample(n) for n in ("kubemaas_prompt_tokens_total",
                                     "kubemaas_generation_tokens_total",
                                     "kubemaas_time_to_first_token_seconds_count",
                                     "kubemaas_inter_token_latency_seconds_count")}
    result = client.completions.create(model="tiny", prompt="hello world", max_tokens=5,
                                       temperature=0)
    usage = result.usage
    assert sample("kubemaas_prompt_tokens_total") - before[
        "kubemaas_prompt_tokens_total"] == usage.prompt_tokens
    assert sample("kubemaas_generation_tokens_total") - before[
        "kubemaas_generation_tokens_total"] == usage.completion_tokens
    assert sample("kubemaas_time_to_first_token_seconds_count") - before[
        "kubemaas_time_to_first_token_seconds_count"] == 1
    assert sample("kubemaas_inter_token_latency_seconds_count") - before[
        "kubemaas_inter_token_latency_seconds_count"] == usage.completion_tokens - 1
    assert sample("kubemaas_num_requests_running") == 0
    assert sample("kubemaas_kv_cache_usage_ratio") == 0
