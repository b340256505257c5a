"""One API suite over both engines: the same front (routes, admission, auth, errors, metrics,
OpenAI's parameters) whether `--engine builtin` or `--engine vllm` runs the model, through the
official openai client and raw HTTP. One server per engine for the module, on the same
SmolLM2-135M-Instruct transformers directory (hack/smollm2-transformers), with an auth token.

The vLLM half runs its server with the vLLM venv's python (hack/vllm-venv); without that venv it
is skipped, except under CI=true, where it fails. Run it under `flock /tmp/kubemaas-vllm.lock`
(one vLLM process tree per machine); `-k builtin` needs no lock.

Optional sampling features (engine_api.FEATURES) are checked against what each engine says it
honours (`sampling_features` in /v2/models/{name}): honoured ones must do what they say, the
others must be refused with a 400 naming the field. vLLM must honour all of them."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.models_on_disk import smollm2_transformers_dir, vllm_venv_python
from tests.runtime.conftest import RuntimeServer, runtime_env

NAME = "smollm2"
TOKEN = "front-suite-token"
MAX_NUM_SEQS, MAX_QUEUE = 2, 4
VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_LOGGING_LEVEL": "WARNING"}
ALL_FEATURES = {"top_k", "penalties", "logprobs", "json_schema"}
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
CHAT = {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def smollm2_dir() -> Path:
    return smollm2_transformers_dir()


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


def vllm_python() -> Path:
    return vllm_venv_python()


@pytest.fixture(scope="module", params=["builtin", "vllm"])
def engine(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def server(engine, module_tmp, smollm2_dir):
    token_file = module_tmp / "token"
    token_file.write_text(TOKEN + "\n")
    args = ["--model-uri", f"file://{smollm2_dir}", "--format", "transformers", "--task",
            "text-generation", "--engine", engine, "--name", NAME, "--max-model-len", "2048",
            "--max-num-seqs", str(MAX_NUM_SEQS), "--max-queue", str(MAX_QUEUE),
            "--auth-token-file", str(token_file)]
    if engine == "vllm":
        running = RuntimeServer(args, module_tmp, env=runtime_env(**VLLM_ENV),
                                command=[str(vllm_python()), "-m", "kubemaas_runtime", "serve"])
    else:
        running = RuntimeServer(args, module_tmp)
    running.start(timeout=900)
    yield running
    running.stop(timeout=60)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=TOKEN, max_retries=0, timeout=600)


@pytest.fixture(scope="module")
def features(server, engine) -> set[str]:
    parameters = httpx.get(f"{server.url}/v2/models/{NAME}", headers=AUTH,
                           timeout=10).json()["parameters"]
    assert parameters["engine"] == engine
    reported = set(parameters["sampling_features"])
    assert reported <= ALL_FEATURES
    if engine == "vllm":
        assert reported == ALL_FEATURES
    return reported


def post(server, path: str, body, **kwargs) -> httpx.Response:
    if isinstance(body, bytes):
        return httpx.post(f"{server.url}{path}", content=body, timeout=600,
                          headers={**AUTH, "Content-Type": "application/json"}, **kwargs)
    return httpx.post(f"{server.url}{path}", json=body, headers=AUTH, timeout=600, **kwargs)


def openai_error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


def metric(server, name: str) -> float:
    return server.metric(name, f'model="{NAME}"')


# -- routes, auth, models ---------------------------------------------------------------
def test_models_list_and_retrieve(server, client):
    (card,) = client.models.list().data
    assert card.id == NAME and card.object == "model"
    assert client.models.retrieve(NAME).id == NAME
    missing = httpx.get(f"{server.url}/v1/models/nope", headers=AUTH, timeout=10)
    assert openai_error(missing, 404)["code"] == "model_not_found"


def test_auth_guards_v1_and_v2_but_not_the_probes(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        assert httpx.post(f"{server.url}/v1/chat/completions", json=CHAT, headers=headers,
                          timeout=30).status_code == 401
        assert httpx.get(f"{server.url}/v1/models", headers=headers, timeout=30
                         ).status_code == 401
        assert httpx.post(f"{server.url}/v2/models/{NAME}/generate", headers=headers,
                          json={"text_input": "x"}, timeout=30).status_code == 401
    assert httpx.get(f"{server.url}/v2/health/ready", timeout=10).status_code == 200
    assert httpx.get(f"{server.url}/metrics", timeout=10).status_code == 200
    assert post(server, "/v1/chat/completions", CHAT).status_code == 200


# -- text, streams, usage ---------------------------------------------------------------
@pytest.mark.parametrize("chat", [True, False], ids=["chat", "completions"])
def test_stream_concatenates_to_the_non_streamed_text_with_the_same_usage(client, chat):
    kwargs = {"model": NAME, "max_tokens": 12, "temperature": 0}
    if chat:
        create, kwargs["messages"] = client.chat.completions.create, QUESTION
    else:
        create, kwargs["prompt"] = client.completions.create, "Kubernetes is"
    whole = create(**kwargs)
    chunks = list(create(**kwargs, stream=True, stream_options={"include_usage": True}))
    if chat:
        assert chunks[0].choices[0].delta.role == "assistant"
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == whole.choices[0].message.content and text
    else:
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        assert text == whole.choices[0].text and text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == whole.choices[0].finish_reason and set(finishes[:-1]) == {None}
    assert chunks[-1].usage.model_dump() == whole.usage.model_dump()


def test_usage_counts_the_templated_prompt_and_every_generated_token(client, tokenizer):
    result = client.chat.completions.create(model=NAME, messages=QUESTION, max_tokens=7,
                                            temperature=0, extra_body={"ignore_eos": True})
    prompt = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=True)
    prompt = prompt["input_ids"] if hasattr(prompt, "keys") else prompt
    assert result.usage.prompt_tokens == len(prompt)
    assert result.usage.completion_tokens == 7 and result.choices[0].finish_reason == "length"
    assert result.usage.total_tokens == len(prompt) + 7


def test_a_stop_string_ends_the_text_before_it(client):
    kwargs = {"model": NAME, "prompt": "1, 2, 3, 4, 5, 6, 7,", "max_tokens": 20,
              "temperature": 0}
    free = client.completions.create(**kwargs).choices[0].text
    assert " 9" in free, free  # the model counts on: the stop string is reached
    stopped = client.completions.create(**kwargs, stop=[" 9"]).choices[0]
    assert stopped.finish_reason == "stop" and stopped.text == free[:free.index(" 9")]


def test_a_seed_repeats_a_sample(client):
    kwargs = {"model": NAME, "messages": QUESTION, "max_tokens": 12, "temperature": 1.0,
              "seed": 1234}
    first = client.chat.completions.create(**kwargs).choices[0].message.content
    assert client.chat.completions.create(**kwargs).choices[0].message.content == first


def test_v2_generate_equals_completions_and_its_stream_concatenates(server, client):
    expected = client.completions.create(model=NAME, prompt="The sea is", max_tokens=6,
                                         temperature=0).choices[0].text
    body = {"text_input": "The sea is", "parameters": {"max_tokens": 6, "temperature": 0}}
    answer = post(server, f"/v2/models/{NAME}/generate", body)
    assert answer.status_code == 200 and answer.json()["text_output"] == expected
    assert answer.json()["usage"]["completion_tokens"] == 6
    with httpx.Client(timeout=600, headers=AUTH) as http, http.stream(
            "POST", f"{server.url}/v2/models/{NAME}/generate_stream", json=body) as response:
        events = [json.loads(line[6:]) for line in response.iter_lines() if line]
    assert "".join(e["text_output"] for e in events) == expected
    missing = post(server, "/v2/models/nope/generate", body)
    assert missing.status_code == 404 and "nope" in missing.json()["error"]
    refused = post(server, f"/v2/models/{NAME}/generate",
                   {"text_input": "x", "parameters": {"n": 2}})
    assert refused.status_code == 400 and "n" in refused.json()["error"]
    infer = post(server, f"/v2/models/{NAME}/infer", {"inputs": [
        {"name": "text_input", "datatype": "BYTES", "shape": [1], "data": ["x"]}]})
    assert infer.status_code == 400 and "/v1/chat/completions" in infer.json()["error"]


# -- n ----------------------------------------------------------------------------------
def test_n_choices_are_seeded_samples_counted_in_usage(client):
    kwargs = {"model": NAME, "messages": QUESTION, "max_tokens": 10, "temperature": 1.0,
              "seed": 99, "n": 3}
    result = client.chat.completions.create(**kwargs)
    assert [c.index for c in result.choices] == [0, 1, 2]
    texts = [c.message.content for c in result.choices]
    assert len(set(texts)) > 1, texts  # three seeds, not one sample thrice
    assert [c.message.content for c in client.chat.completions.create(**kwargs).choices] == texts
    single = client.chat.completions.create(**{**kwargs, "n": 1})
    assert single.choices[0].message.content == texts[0]  # choice 0 is seed 99 itself
    tokens = client.chat.completions.create(**{**kwargs, "extra_body": {"ignore_eos": True}})
    assert tokens.usage.completion_tokens == 30
    assert tokens.usage.prompt_tokens == single.usage.prompt_tokens


def test_n_streams_each_choice_under_its_index(client):
    kwargs = {"model": NAME, "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0,
              "n": 2}
    whole = client.completions.create(**kwargs)
    chunks = list(client.completions.create(**kwargs, stream=True,
                                            stream_options={"include_usage": True}))
    for index in (0, 1):
        text = "".join(c.choices[0].text for c in chunks
                       if c.choices and c.choices[0].index == index)
        assert text == whole.choices[index].text
        finishes = [c.choices[0].finish_reason for c in chunks
                    if c.choices and c.choices[0].index == index and c.choices[0].finish_reason]
        assert finishes == [whole.choices[index].finish_reason]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


# -- errors -----------------------------------------------------------------------------
@pytest.mark.parametrize("field, value", [
    ("max_tokens", 0), ("temperature", 2.5), ("top_p", 0), ("n", 0), ("n", 17), ("stop", 7),
    ("seed", "x"), ("stream", "yes"), ("logprobs", "yes"), ("top_logprobs", 3),
    ("presence_penalty", 2.5), ("frequency_penalty", "x"), ("top_k", -2),
    ("response_format", {"type": "xml"}), ("response_format", {"type": "json_schema"}),
    ("tools", [{"type": "function"}]), ("logit_bias", {"1": 5}),
])
def test_bad_parameters_are_400_naming_them(server, field, value):
    error = openai_error(post(server, "/v1/chat/completions", {**CHAT, field: value}), 400)
    assert error["param"] == field and field in error["message"]
    assert error["type"] == "invalid_request_error"


def test_error_shapes_404_413_and_malformed(server, client):
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="gpt-4", messages=QUESTION)
    assert missing.value.body["code"] == "model_not_found"
    assert "JSON" in openai_error(post(server, "/v1/chat/completions", b"{nope"), 400)[
        "message"]
    big = b'{"model": "smollm2", "prompt": "' + b"a" * (9 * 1024 * 1024) + b'"}'
    assert openai_error(post(server, "/v1/completions", big), 413)["code"] == \
        "request_too_large"
    long = post(server, "/v1/completions", {"model": NAME, "prompt": "hello " * 10,
                                            "max_tokens": 2045})
    assert openai_error(long, 400)["code"] == "context_length_exceeded"


def open_stream(server) -> tuple[httpx.Client, httpx.Response]:
    http = httpx.Client(timeout=600, headers=AUTH)
    request = http.build_request("POST", f"{server.url}/v1/completions", json={
        "model": NAME, "prompt": "Tell me a long story.", "max_tokens": 1500,
        "ignore_eos": True, "stream": True})
    return http, http.send(request, stream=True)


def test_a_full_engine_is_503_and_streams_hold_their_admission_until_they_end(server):
    capacity = MAX_NUM_SEQS + MAX_QUEUE
    requests_before = metric(server, "kubemaas_requests_total")
    opened = [open_stream(server) for _ in range(MAX_NUM_SEQS)]
    try:  # the running ones first, then those that wait for a slot
        wait_for(lambda: metric(server, "kubemaas_num_requests_running") == MAX_NUM_SEQS,
                 "the first streams did not start")
        opened += [open_stream(server) for _ in range(MAX_QUEUE)]
        assert [r.status_code for _, r in opened] == [200] * capacity
        assert metric(server, "kubemaas_inflight_requests") == capacity  # held by the streams
        assert metric(server, "kubemaas_requests_total") == requests_before  # not yet counted
        full = post(server, "/v1/completions", {"model": NAME, "prompt": "hi",
                                                "max_tokens": 2})
        assert openai_error(full, 503) and full.headers["Retry-After"].isdigit()
        assert metric(server, "kubemaas_requests_total") == requests_before + 1
    finally:
        for http, response in opened:
            response.close()
            http.close()
    wait_for(lambda: metric(server, "kubemaas_inflight_requests") == 0
             and metric(server, "kubemaas_num_requests_running")
             + metric(server, "kubemaas_num_requests_waiting") == 0,
             "the closed streams kept their slots")
    assert metric(server, "kubemaas_requests_total") == requests_before + 1 + capacity
    assert post(server, "/v1/completions", {"model": NAME, "prompt": "hi",
                                            "max_tokens": 2}).status_code == 200


def wait_for(predicate, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


# -- metrics ----------------------------------------------------------------------------
def test_metric_names_are_the_same_whichever_engine(server, client, engine):
    names = ("kubemaas_requests_total", "kubemaas_request_duration_seconds_count",
             "kubemaas_prompt_tokens_total", "kubemaas_generation_tokens_total",
             "kubemaas_time_to_first_token_seconds_count",
             "kubemaas_inter_token_latency_seconds_count")
    before = {n: metric(server, n) for n in names}
    usage = client.completions.create(model=NAME, prompt="hello world", max_tokens=5,
                                      temperature=0, extra_body={"ignore_eos": True}).usage
    delta = {n: metric(server, n) - before[n] for n in names}
    assert delta == {"kubemaas_requests_total": 1, "kubemaas_request_duration_seconds_count": 1,
                     "kubemaas_prompt_tokens_total": usage.prompt_tokens,
                     "kubemaas_generation_tokens_total": 5,
                     "kubemaas_time_to_first_token_seconds_count": 1,
                     "kubemaas_inter_token_latency_seconds_count": 4}
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    for name in ("kubemaas_inflight_requests", "kubemaas_num_requests_running",
                 "kubemaas_num_requests_waiting", "kubemaas_kv_cache_usage_ratio",
                 "kubemaas_model_ready"):
        assert f"\n{name}{{" in text, name
    assert server.metric("kubemaas_engine_info", f'engine="{engine}"') == 1


# -- the optional sampling features -----------------------------------------------------
def refused(server, body: dict, field: str) -> None:
    error = openai_error(post(server, "/v1/chat/completions", body), 400)
    assert error["param"] == field and field in error["message"], error


def test_logprobs_are_self_consistent_and_streamed_alike(server, client, features):
    kwargs = {"model": NAME, "messages": QUESTION, "max_tokens": 8, "temperature": 0,
              "logprobs": True, "top_logprobs": 3}
    if "logprobs" not in features:
        refused(server, {**CHAT, "logprobs": True}, "logprobs")
        error = openai_error(post(server, "/v1/completions", {
            "model": NAME, "prompt": "x", "logprobs": 2}), 400)
        assert error["param"] == "logprobs"
        return
    result = client.chat.completions.create(**kwargs)
    content = result.choices[0].logprobs.content
    assert len(content) == result.usage.completion_tokens
    for entry in content:  # greedy: the chosen token is the most likely one
        assert len(entry.top_logprobs) == 3
        assert entry.token == entry.top_logprobs[0].token
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob, abs=1e-4)
        ranked = [t.logprob for t in entry.top_logprobs]
        assert ranked == sorted(ranked, reverse=True) and ranked[0] <= 0
        assert entry.bytes == list(entry.token.encode())
    assert "".join(e.token for e in content).startswith(result.choices[0].message.content)
    streamed = [c.choices[0].logprobs for c in client.chat.completions.create(
        **kwargs, stream=True) if c.choices and c.choices[0].logprobs]
    tokens = [e.token for lp in streamed for e in lp.content]
    assert tokens == [e.token for e in content]
    completion = client.completions.create(model=NAME, prompt="The capital of France is",
                                           max_tokens=5, temperature=0, logprobs=2)
    logprobs = completion.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == 5
    assert logprobs.text_offset == sorted(logprobs.text_offset) and logprobs.text_offset[0] == 0
    for chosen, top in zip(logprobs.token_logprobs, logprobs.top_logprobs):
        assert 1 <= len(top) <= 2 and chosen == pytest.approx(max(top.values()), abs=1e-4)


def test_penalties_change_a_repetitive_answer(server, client, features):
    body = {"model": NAME, "prompt": "The cat, the cat, the cat, the cat,", "max_tokens": 12,
            "temperature": 0}
    if "penalties" not in features:
        refused(server, {**CHAT, "presence_penalty": 1.0}, "presence_penalty")
        refused(server, {**CHAT, "frequency_penalty": -1.0}, "frequency_penalty")
        return
    plain = client.completions.create(**body).choices[0].text
    assert plain.count("cat") >= 3, plain  # the model repeats itself
    for field in ("presence_penalty", "frequency_penalty"):
        penalised = client.completions.create(**body, **{field: 2.0}).choices[0].text
        assert penalised != plain and penalised.count("cat") < plain.count("cat"), field


def test_top_k_one_samples_the_greedy_answer(server, client, features):
    if "top_k" not in features:
        refused(server, {**CHAT, "top_k": 5}, "top_k")
        return
    kwargs = {"model": NAME, "messages": QUESTION, "max_tokens": 10}
    greedy = client.chat.completions.create(**kwargs, temperature=0).choices[0].message.content
    for seed in (1, 2):
        sampled = client.chat.completions.create(**kwargs, temperature=1.5, seed=seed,
                                                 extra_body={"top_k": 1})
        assert sampled.choices[0].message.content == greedy


SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "enum": [
    "Paris", "Lyon", "Marseille"]}, "population": {"type": "integer"}},
    "required": ["city", "population"], "additionalProperties": False}


def test_json_schema_output_parses_and_validates(server, client, features):
    response_format = {"type": "json_schema", "json_schema": {"name": "city",
                                                              "schema": SCHEMA}}
    if "json_schema" not in features:
        refused(server, {**CHAT, "response_format": response_format}, "response_format")
        refused(server, {**CHAT, "response_format": {"type": "json_object"}},
                "response_format")
        return
    messages = [{"role": "user", "content": "Give the largest city of France and its "
                                            "population as JSON."}]
    result = client.chat.completions.create(model=NAME, messages=messages, max_tokens=60,
                                            temperature=0, response_format=response_format)
    assert result.choices[0].finish_reason == "stop", result.choices[0].message.content
    doc = json.loads(result.choices[0].message.content)
    assert set(doc) == {"city", "population"} and doc["city"] in SCHEMA["properties"][
        "city"]["enum"]
    assert isinstance(doc["population"], int) and not isinstance(doc["population"], bool)
    anything = client.chat.completions.create(
        model=NAME, messages=messages, max_tokens=60, temperature=0,
        response_format={"type": "json_object"})
    assert anything.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(anything.choices[0].message.content), dict)
