"""TorchScript, ExportedProgram and safetensors+architecture models, served for real; the v2
protocol through httpx and tritonclient (JSON and binary); every request error path."""

from __future__ import annotations

import asyncio

import httpx
import numpy as np
import pytest
import torch
import tritonclient.http as triton

from tests.runtime.conftest import RuntimeServer, start_servers
from tests.runtime.tiny_models import build_exported, build_safetensors, build_torchscript

MAX_REQUEST_BYTES = 4096


@pytest.fixture(scope="module")
def servers(module_tmp):
    models = {
        "ts": build_torchscript(module_tmp / "ts"),
        "ep": build_exported(module_tmp / "ep"),
        "st": build_safetensors(module_tmp / "st"),
    }
    running = {
        "ts": RuntimeServer(["--model-uri", f"file://{module_tmp / 'ts'}",
                             "--format", "torchscript", "--name", "ts"], module_tmp),
        "ep": RuntimeServer(["--model-uri", f"file://{module_tmp / 'ep'}",
                             "--format", "exported-program", "--name", "ep"], module_tmp),
        "st": RuntimeServer(["--model-uri", "pvc://models/tiny-mlp", "--format", "safetensors",
                             "--architecture", "tests.runtime.tiny_models:make_mlp",
                             "--model-dir", str(module_tmp / "st"), "--variant", "blue",
                             "--max-request-bytes", str(MAX_REQUEST_BYTES)], module_tmp),
    }
    start_servers(*running.values())
    yield running, models
    for server in running.values():
        assert server.stop() == 0, server.logs()


def infer(server, model, inputs, **extra):
    return httpx.post(f"{server.url}/v2/models/{model}/infer",
                      json={"inputs": inputs, **extra}, timeout=30)


def fp32(name, array):
    array = np.asarray(array, dtype=np.float32)
    return {"name": name, "datatype": "FP32", "shape": list(array.shape),
            "data": array.reshape(-1).tolist()}


def local(model, *args):
    with torch.no_grad():
        out = model(*[torch.as_tensor(a) for a in args])
    return [o.numpy() for o in (out if isinstance(out, tuple) else (out,))]


X = np.arange(8, dtype=np.float32).reshape(2, 4) / 4


def test_server_metadata_and_health(servers):
    running, _ = servers
    url = running["st"].url
    assert httpx.get(f"{url}/v2").json()["extensions"] == ["binary_tensor_data"]
    assert httpx.get(f"{url}/v2/health/live").status_code == 200
    assert httpx.get(f"{url}/v2/health/ready").status_code == 200
    assert httpx.get(f"{url}/v2/models/tiny-mlp/ready").json()["ready"] is True


def test_model_metadata(servers):
    running, _ = servers
    st = httpx.get(f"{running['st'].url}/v2/models/tiny-mlp").json()
    assert st["platform"] == "pytorch_safetensors" and st["versions"] == ["1"]
    assert st["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]
    assert st["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 3]}]
    assert st["parameters"]["variant"] == "blue"
    assert st["parameters"]["quantization"] == "none"
    ep = httpx.get(f"{running['ep'].url}/v2/models/ep/versions/1").json()
    assert ep["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 4]},
                            {"name": "offset", "datatype": "INT64", "shape": [-1]}]
    assert ep["outputs"] == [{"name": "output_0", "datatype": "FP32", "shape": [-1, 3]},
                             {"name": "output_1", "datatype": "INT64", "shape": [-1]}]
    ts = httpx.get(f"{running['ts'].url}/v2/models/ts").json()
    assert [i["name"] for i in ts["inputs"]] == ["x"]


@pytest.mark.parametrize("key, model, output", [("ts", "ts", "output"),
                                                ("st", "tiny-mlp", "logits")])
def test_single_input_models_match_local_forward(servers, key, model, output):
    running, models = servers
    response = infer(running[key], model, [fp32("x", X)], id="req-1")
    assert response.status_code == 200, response.text
    doc = response.json()
    assert doc["id"] == "req-1" and doc["model_name"] == model
    (out,) = doc["outputs"]
    assert out["name"] == output and out["shape"] == [2, 3] and out["datatype"] == "FP32"
    np.testing.assert_allclose(np.array(out["data"]).reshape(2, 3), local(models[key], X)[0],
                               rtol=1e-5, atol=1e-6)


def test_exported_program_two_inputs_and_output_selection(servers):
    running, models = servers
    offset = np.array([3, -1], dtype=np.int64)
    inputs = [fp32("x", X), {"name": "offset", "datatype": "INT64", "shape": [2],
                             "data": offset.tolist()}]
    doc = infer(running["ep"], "ep", inputs, outputs=[{"name": "output_1"}]).json()
    assert [o["name"] for o in doc["outputs"]] == ["output_1"]
    assert doc["outputs"][0]["data"] == (offset * 2).tolist()
    assert doc["outputs"][0]["datatype"] == "INT64"
    full = infer(running["ep"], "ep", inputs).json()
    np.testing.assert_allclose(np.array(full["outputs"][0]["data"]).reshape(2, 3),
                               local(models["ep"], X, offset)[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("binary", [False, True])
def test_tritonclient(servers, binary):
    running, models = servers
    client = triton.InferenceServerClient(running["ep"].url.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("ep")
    assert client.get_model_metadata("ep")["platform"] == "pytorch_exported_program"
    x = np.random.default_rng(1).normal(size=(3, 4)).astype(np.float32)
    offset = np.array([1, 2, 3], dtype=np.int64)
    inputs = [triton.InferInput("x", [3, 4], "FP32"), triton.InferInput("offset", [3], "INT64")]
    inputs[0].set_data_from_numpy(x, binary_data=binary)
    inputs[1].set_data_from_numpy(offset, binary_data=binary)
    outputs = [triton.InferRequestedOutput("output_0", binary_data=binary),
               triton.InferRequestedOutput("output_1", binary_data=binary)]
    result = client.infer("ep", inputs, outputs=outputs, request_id="t-1")
    assert result.get_response()["id"] == "t-1"
    np.testing.assert_allclose(result.as_numpy("output_0"), local(models["ep"], x, offset)[0],
                               rtol=1e-5, atol=1e-6)
    assert result.as_numpy("output_1").tolist() == [2, 4, 6]
    # no outputs named: tritonclient asks for every output in binary
    default = client.infer("ep", inputs)
    assert default.as_numpy("output_1").tolist() == [2, 4, 6]
    client.close()


def test_concurrent_requests_are_split_back_one_for_one(servers):
    running, models = servers
    rng = np.random.default_rng(7)
    payloads = [rng.normal(size=(int(rng.integers(1, 4)), 4)).astype(np.float32)
                for _ in range(24)]

    async def fire():
        async with httpx.AsyncClient(base_url=running["ep"].url, timeout=30) as client:
            return await asyncio.gather(*[client.post("/v2/models/ep/infer", json={"inputs": [
                fp32("x", x), {"name": "offset", "datatype": "INT64", "shape": [len(x)],
                               "data": list(range(len(x)))}]}) for x in payloads])

    for x, response in zip(payloads, asyncio.run(fire())):
        assert response.status_code == 200, response.text
        out = response.json()["outputs"][0]
        np.testing.assert_allclose(np.array(out["data"]).reshape(len(x), 3),
                                   local(models["ep"], x, np.zeros(len(x), np.int64))[0],
                                   rtol=1e-5, atol=1e-6)


ERROR_CASES = [
    # (body or inputs, expected status, substring of the error)
    (b"{ not json", 400, "malformed JSON"),
    ({"inputs": []}, 400, "non-empty 'inputs'"),
    ([fp32("x", X), fp32("y", X)], 400, "unknown input 'y'"),
    ([{"name": "x", "datatype": "INT64", "shape": [1, 4], "data": [1, 2, 3, 4]}], 400,
     "input 'x': expected datatype FP32, got INT64"),
    ([fp32("x", np.zeros((2, 5)))], 400, "input 'x': expected shape [-1, 4]"),
    ([{"name": "x", "datatype": "FP32", "shape": [2, 4], "data": [1, 2, 3]}], 400,
     "input 'x': shape holds 8 elements but data has 3"),
    ([{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": ["a", "b", "c", "d"]}], 400,
     "input 'x': datatype FP32 expects numbers"),
    ({"inputs": [fp32("x", X)], "outputs": [{"name": "nope"}]}, 400, "unknown output 'nope'"),
    ([fp32("x", np.zeros((300, 4)))], 413, "exceeds the limit"),
    ([fp32("x", np.zeros((0, 4)))], 400, "no rows"),
]


@pytest.mark.parametrize("payload, status, message", ERROR_CASES)
def test_bad_requests_get_v2_errors_and_server_keeps_serving(servers, payload, status, message):
    running, _ = servers
    url = f"{running['st'].url}/v2/models/tiny-mlp/infer"
    if isinstance(payload, bytes):
        response = httpx.post(url, content=payload, timeout=30)
    elif isinstance(payload, dict):
        response = httpx.post(url, json=payload, timeout=30)
    else:
        response = httpx.post(url, json={"inputs": payload}, timeout=30)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert message in response.json()["error"]
    assert infer(running["st"], "tiny-mlp", [fp32("x", X)]).status_code == 200


def test_missing_input_is_named(servers):
    running, _ = servers
    response = infer(running["ep"], "ep", [fp32("x", X)])
    assert response.status_code == 400 and "missing input 'offset'" in response.json()["error"]
    mismatched = infer(running["ep"], "ep", [fp32("x", X), {
        "name": "offset", "datatype": "INT64", "shape": [3], "data": [1, 2, 3]}])
    assert mismatched.status_code == 400
    assert "input 'offset': batch dimension 3 differs" in mismatched.json()["error"]


def test_chunked_oversize_body_is_413(servers):
    running, _ = servers

    def chunks():
        for _ in range(10):
            yield b" " * 1024

    response = httpx.post(f"{running['st'].url}/v2/models/tiny-mlp/infer", content=chunks())
    assert response.status_code == 413 and "exceeds" in response.json()["error"]


@pytest.mark.parametrize("path, method", [
    ("/v2/models/other", "GET"), ("/v2/models/other/ready", "GET"),
    ("/v2/models/other/infer", "POST"), ("/v2/models/tiny-mlp/versions/2/infer", "POST"),
    ("/v2/nothing-here", "GET"),
])
def test_unknown_model_or_route_is_404(servers, path, method):
    running, _ = servers
    response = httpx.request(method, running["st"].url + path, json={"inputs": [fp32("x", X)]})
    assert response.status_code == 404
    assert "error" in response.json()


def test_request_metrics(servers):
    running, _ = servers
    server = running["st"]
    labels = 'model="tiny-mlp",variant="blue"'
    before = server.metric("kubemaas_requests_total", labels)
    infer(server, "tiny-mlp", [fp32("x", X)])
    assert server.metric("kubemaas_requests_total", labels) == before + 1
    assert server.metric("kubemaas_request_duration_seconds_count", labels) >= before + 1
    assert server.metric("kubemaas_inflight_requests", labels) == 0
    assert server.metric("kubemaas_model_load_seconds", labels) > 0
    assert server.metric("kubemaas_request_failures_total", 'code="400"') >= 0
