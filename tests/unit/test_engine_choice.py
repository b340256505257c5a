"""The runtime's engine rule at start: vLLM where it can serve the model, builtin otherwise,
and only what the chosen engine can really run is accepted."""

import pytest
from kubemaas_runtime.config import parse_serve_config
from kubemaas_runtime.engine_choice import (
    ModelFacts,
    VllmAvailability,
    choose_engine,
    model_architectures,
)
from kubemaas_runtime.errors import ModelLoadFailed

VLLM = VllmAvailability("0.32.0", frozenset({"LlamaForCausalLM", "Qwen2ForCausalLM"}))
NO_VLLM = VllmAvailability(error="not installed")
LLAMA = ModelFacts("text-generation", "transformers", ("LlamaForCausalLM",))
GGUF = ModelFacts("text-generation", "gguf")
EXOTIC = ModelFacts("text-generation", "transformers", ("TinyTestForCausalLM",))
ENCODER = ModelFacts("feature-extraction", "transformers", ("BertModel",))


@pytest.mark.parametrize("requested, tp, gpus, model, vllm, reason", [
    ("auto", None, 0, LLAMA, NO_VLLM, "auto: vLLM does not import in this image (not installed)"),
    ("builtin", None, 0, LLAMA, VLLM, "requested"),
    ("auto", None, 1, GGUF, VLLM, "auto: vLLM serves --format transformers, not gguf"),
    ("auto", None, 0, EXOTIC, VLLM, ("auto: vLLM 0.32.0 has no TinyTestForCausalLM in its "
                                    "model registry")),
    ("auto", None, 0, ENCODER, VLLM, ("auto: vLLM serves --task text-generation here, not "
                                     "feature-extraction")),
    ("builtin", 1, 4, LLAMA, VLLM, "requested"),  # an explicit TP 1 runs on the first GPU
])
def test_builtin_runs_on_one_device(requested, tp, gpus, model, vllm, reason):
    choice = choose_engine(requested, tp, gpus, model, vllm)
    assert (choice.engine, choice.reason, choice.tensor_parallel_size) == ("builtin", reason, 1)


@pytest.mark.parametrize("requested, tp, gpus, split, reason", [
    ("auto", None, 0, 1, ("auto: vLLM 0.32.0 imports and serves LlamaForCausalLM from --format "
                         "transformers")),
    ("vllm", None, 0, 1, "requested (vLLM 0.32.0)"),
    ("auto", None, 2, 2, None),     # every visible GPU is the default split
    ("vllm", 2, 0, 2, None),        # vLLM's CPU backend splits over ranks too
    ("vllm", 1, 8, 1, None),
])
def test_vllm_takes_what_it_serves_with_the_split(requested, tp, gpus, split, reason):
    choice = choose_engine(requested, tp, gpus, LLAMA, VLLM)
    assert (choice.engine, choice.tensor_parallel_size) == ("vllm", split)
    assert reason is None or choice.reason == reason


@pytest.mark.parametrize("requested, tp, gpus, model, vllm, message", [
    ("vllm", None, 1, LLAMA, NO_VLLM, "--engine vllm: vLLM does not import"),
    ("vllm", None, 0, GGUF, VLLM, "--format transformers, not gguf"),
    ("vllm", None, 0, EXOTIC, VLLM, "no TinyTestForCausalLM"),
    ("vllm", None, 0, ENCODER, VLLM, "not feature-extraction"),
    ("auto", None, 2, GGUF, VLLM, "2 visible GPUs"),
    ("auto", None, 2, LLAMA, NO_VLLM, "2 visible GPUs"),
    ("builtin", 2, 2, LLAMA, VLLM, "--tensor-parallel-size 2"),
    ("auto", 8, 0, GGUF, VLLM, "--tensor-parallel-size 8"),  # CPU: builtin splits over nothing
])
def test_what_it_cannot_run_is_refused_with_the_fix(requested, tp, gpus, model, vllm, message):
    with pytest.raises(ModelLoadFailed) as caught:
        choose_engine(requested, tp, gpus, model, vllm)
    assert message in str(caught.value)
    assert "--engine" in str(caught.value)


def test_architectures_come_from_config_json(tmp_path):
    assert model_architectures(tmp_path) == ()
    (tmp_path / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    assert model_architectures(tmp_path) == ("LlamaForCausalLM",)
    (tmp_path / "config.json").write_text('not json')
    assert model_architectures(tmp_path) == ()


def test_engine_and_tp_come_from_the_environment():
    cfg = parse_serve_config(["--model-uri", "pvc://a/b", "--format", "gguf"],
                             {"KUBEMAAS_ENGINE": "builtin", "KUBEMAAS_TENSOR_PARALLEL_SIZE": "2"})
    assert (cfg.engine, cfg.tensor_parallel_size) == ("builtin", 2)
    assert parse_serve_config(["--model-uri", "pvc://a/b", "--format", "gguf"], {}).engine == "auto"


@pytest.mark.parametrize("cores, ranks, binding", [
    ([0, 1], 1, "0,1"), ([0, 1], 2, "0|1"), ([2, 3, 4, 5, 6], 2, "2,3,4|5,6"),
])
def test_vllm_cpu_ranks_get_their_own_cores(cores, ranks, binding):
    from kubemaas_runtime.generation.vllm_engine import omp_binding

    assert omp_binding(cores, ranks) == binding
