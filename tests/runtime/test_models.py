"""Model classes in-process (no server): quantized variants, grouping, load failures, and the
CPU-count rules."""

from __future__ import annotations

import json

import numpy as np
import orjson
import pytest
import torch
from kubemaas_runtime.device import available_cpus, cgroup_cpu_limit
from kubemaas_runtime.errors import InvalidInput, ModelLoadFailed, QuantizationUnsupported
from kubemaas_runtime.models.base import ModelOptions, load_and_warm_up, run_predict
from kubemaas_runtime.models.registry import create_model
from kubemaas_runtime.protocol import (
    InferRequest,
    Tensor,
    encode_infer_response,
    parse_infer_request,
)

from tests.runtime.tiny_models import build_safetensors, build_torchscript

ARCH = "tests.runtime.tiny_models:make_mlp"


def x_tensor(rows: int) -> Tensor:
    data = np.arange(rows * 4, dtype=np.float32).reshape(rows, 4) / 10
    return Tensor("x", "FP32", data.shape, data)


def loaded(path, quantization="none", fmt="safetensors"):
    model = create_model(fmt, ModelOptions(path=path, name="m", architecture=ARCH,
                                           quantization=quantization))
    load_and_warm_up(model)
    return model


@pytest.fixture(scope="module")
def mlp_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("mlp")
    reference = build_safetensors(directory)
    return directory, reference


@pytest.fixture
def native_half(monkeypatch):
    """Pretend the CPU computes fp16/bf16 natively, so the cast paths run on any CPU (the
    refusal without that support is tested in test_quantization.py)."""
    monkeypatch.setattr("kubemaas_runtime.quantization.cpu_half_support",
                        lambda method: "test-pretends")


@pytest.mark.parametrize("quantization, tolerance", [
    ("none", 1e-6), ("fp16", 2e-2), ("bf16", 1e-1), ("int8-dynamic", 1e-1),
    ("int8-weight-only", 1e-1), ("int4-weight-only", 3e-1)])
def test_quantized_variants_answer_in_declared_datatypes(mlp_dir, native_half, quantization,
                                                         tolerance):
    directory, reference = mlp_dir
    model = loaded(directory, quantization)
    assert model.quantization == quantization and model.ready
    (outputs,) = run_predict(model, [{"x": x_tensor(3)}])
    (logits,) = outputs
    assert logits.name == "logits" and logits.datatype == "FP32" and logits.shape == (3, 3)
    with torch.no_grad():
        expected = reference(torch.from_numpy(x_tensor(3).data)).numpy()
    np.testing.assert_allclose(logits.data, expected, atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("quantization", ["int8-dynamic", "int8-weight-only",
                                          "int4-weight-only"])
def test_torchscript_cannot_be_quantized_silently(tmp_path, quantization):
    build_torchscript(tmp_path)
    with pytest.raises(QuantizationUnsupported, match="TorchScript"):
        loaded(tmp_path, quantization, fmt="torchscript")


def test_batch_is_split_one_for_one(mlp_dir):
    model = loaded(mlp_dir[0])
    batch = [{"x": x_tensor(rows)} for rows in (1, 3, 2)]
    results = run_predict(model, batch)
    assert [r[0].shape for r in results] == [(1, 3), (3, 3), (2, 3)]
    alone = run_predict(model, [{"x": x_tensor(3)}])[0][0]
    np.testing.assert_allclose(results[1][0].data, alone.data, rtol=1e-6)


def test_validate_reports_rows_and_rejects_mismatch(mlp_dir):
    model = loaded(mlp_dir[0])
    inputs, rows = model.validate(InferRequest(None, [x_tensor(2)], None, {}, False, {}))
    assert rows == 2 and set(inputs) == {"x"}
    bad = Tensor("x", "FP32", (2, 5), np.zeros((2, 5), np.float32))
    with pytest.raises(InvalidInput, match=r"expected shape \[-1, 4\]"):
        model.validate(InferRequest(None, [bad], None, {}, False, {}))


def test_torchscript_learns_outputs_on_first_forward(tmp_path):
    build_torchscript(tmp_path)
    model = loaded(tmp_path, fmt="torchscript")
    assert [s.name for s in model.signature.inputs] == ["x"]
    run_predict(model, [{"x": x_tensor(1)}])
    assert [(s.name, s.datatype) for s in model.signature.outputs] == [("output", "FP32")]


def test_load_failures_are_model_load_failed(tmp_path):
    (tmp_path / "model.pt").write_bytes(b"not an archive")
    with pytest.raises(ModelLoadFailed, match="not a TorchScript archive"):
        loaded(tmp_path, fmt="torchscript")
    with pytest.raises(ModelLoadFailed, match="no config.json"):
        create_model("transformers", ModelOptions(path=tmp_path, name="m",
                                                  task="feature-extraction")).load()
    with pytest.raises(ModelLoadFailed, match="exactly one .safetensors"):
        loaded(tmp_path)


def test_cpu_count_follows_cgroup_quota(tmp_path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert cgroup_cpu_limit(tmp_path) == 1.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_limit(tmp_path) is None
    assert available_cpus() >= 1


@pytest.mark.parametrize("datatype, quantization", [("BF16", "bf16"), ("FP16", "fp16")])
def test_half_precision_tensors_through_the_codec(tmp_path, native_half, datatype,
                                                 quantization):
    """A model declared in BF16/FP16: wire data (JSON and binary) -> model -> wire data."""
    reference = build_safetensors(tmp_path)
    (tmp_path / "signature.json").write_text(json.dumps({
        "inputs": [{"name": "x", "datatype": datatype, "shape": [-1, 4]}],
        "outputs": [{"name": "logits", "datatype": datatype, "shape": [-1, 3]}]}))
    model = loaded(tmp_path, quantization)
    values = [0.5, -1.0, 2.0, 0.25]
    request = parse_infer_request(orjson.dumps({
        "inputs": [{"name": "x", "datatype": datatype, "shape": [1, 4], "data": values}],
        "outputs": [{"name": "logits", "parameters": {"binary_data": False}}]}), None)
    inputs, _ = model.validate(request)
    (outputs,) = run_predict(model, [inputs])
    assert outputs[0].datatype == datatype
    body, header_length = encode_infer_response("m", "1", request, outputs)
    assert header_length is None
    got = np.array(orjson.loads(body)["outputs"][0]["data"], dtype=np.float32)
    with torch.no_grad():
        expected = reference(torch.tensor([values])).numpy().reshape(-1)
    np.testing.assert_allclose(got, expected, atol=0.1, rtol=0.05)
    binary_request = parse_infer_request(orjson.dumps({
        "inputs": [{"name": "x", "datatype": datatype, "shape": [1, 4], "data": values}],
        "parameters": {"binary_data_output": True}}), None)
    body, header_length = encode_infer_response("m", "1", binary_request, outputs)
    blob = body[header_length:]
    assert len(blob) == 3 * 2  # three 16-bit values
