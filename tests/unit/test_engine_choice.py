"""The runtime's engine rule at start: only what it can really run is accepted."""

import pytest
from kubemaas_runtime.config import parse_serve_config
from kubemaas_runtime.engine_choice import choose_engine
from kubemaas_runtime.errors import ModelLoadFailed


@pytest.mark.parametrize("requested, tp, gpus, device, reason", [
    ("auto", None, 0, "cpu", "auto: the vLLM engine is not part of this runtime version"),
    ("builtin", None, 0, "cpu", "requested"),
    ("auto", None, 1, "cuda", "auto: the vLLM engine is not part of this runtime version"),
    ("builtin", 1, 4, "cuda", "requested"),          # an explicit TP 1 runs on the first GPU
    ("builtin", None, 2, "cpu", "requested"),        # --device cpu: the GPUs are not used
])
def test_builtin_runs_on_one_device(requested, tp, gpus, device, reason):
    choice = choose_engine(requested, tp, gpus, device)
    assert (choice.engine, choice.reason) == ("builtin", reason)


@pytest.mark.parametrize("requested, tp, gpus, device, message", [
    ("vllm", None, 1, "cuda", "--engine vllm"),
    ("auto", None, 2, "cuda", "2 visible GPUs"),
    ("builtin", 2, 2, "cuda", "--tensor-parallel-size 2"),
    ("auto", 8, 0, "cpu", "--tensor-parallel-size 8"),
])
def test_what_it_cannot_run_is_refused_with_the_fix(requested, tp, gpus, device, message):
    with pytest.raises(ModelLoadFailed) as caught:
        choose_engine(requested, tp, gpus, device)
    assert message in str(caught.value)


def test_engine_and_tp_come_from_the_environment():
    cfg = parse_serve_config(["--model-uri", "pvc://a/b", "--format", "gguf"],
                             {"KUBEMAAS_ENGINE": "builtin", "KUBEMAAS_TENSOR_PARALLEL_SIZE": "2"})
    assert (cfg.engine, cfg.tensor_parallel_size) == ("builtin", 2)
    assert parse_serve_config(["--model-uri", "pvc://a/b", "--format", "gguf"], {}).engine == "auto"
