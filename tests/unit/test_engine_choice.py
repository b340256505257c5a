"""The runtime's engine rule at start: only what it can really run is accepted."""

import pytest
from kubemaas_runtime.config import parse_serve_config
from kubemaas_runtime.engine_choice import choose_engine
from kubemaas_runtime.errors import ModelLoadFailed


@pytest.mark.parametrize("requested, tp, gpus, reason", [
    ("auto", None, 0, "auto: the vLLM engine is not part of this runtime version"),  # CPU
    ("builtin", None, 0, "requested"),
    ("auto", None, 1, "auto: the vLLM engine is not part of this runtime version"),
    ("builtin", 1, 4, "requested"),          # an explicit TP 1 runs on the first GPU
])
def test_builtin_runs_on_one_device(requested, tp, gpus, reason):
    choice = choose_engine(requested, tp, gpus)
    assert (choice.engine, choice.reason) == ("builtin", reason)


@pytest.mark.parametrize("requested, tp, gpus, message", [
    ("vllm", None, 1, "--engine vllm"),
    ("auto", None, 2, "2 visible GPUs"),
    ("builtin", 2, 2, "--tensor-parallel-size 2"),
    ("auto", 8, 0, "--tensor-parallel-size 8"),  # CPU: the builtin engine splits over nothing
])
def test_what_it_cannot_run_is_refused_with_the_fix(requested, tp, gpus, message):
    with pytest.raises(ModelLoadFailed) as caught:
        choose_engine(requested, tp, gpus)
    assert message in str(caught.value)


def test_engine_and_tp_come_from_the_environment():
    cfg = parse_serve_config(["--model-uri", "pvc://a/b", "--format", "gguf"],
                             {"KUBEMAAS_ENGINE": "builtin", "KUBEMAAS_TENSOR_PARALLEL_SIZE": "2"})
    assert (cfg.engine, cfg.tensor_parallel_size) == ("builtin", 2)
    assert parse_serve_config(["--model-uri", "pvc://a/b", "--format", "gguf"], {}).engine == "auto"
