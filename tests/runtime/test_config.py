"""`serve` flags and their KUBEMAAS_* variables; the metrics contract."""

from __future__ import annotations

from pathlib import Path

import pytest
from kubemaas_runtime.config import (
    build_serve_parser,
    default_model_name,
    env_var_for,
    model_path_for_uri,
    parse_serve_config,
)
from kubemaas_runtime.metrics import create_metrics, exposed_sample_names


def test_flags_parse():
    cfg = parse_serve_config(
        ["--model-uri", "pvc://models/minilm", "--format", "transformers",
         "--task", "feature-extraction", "--max-batch-size", "8", "--variant", "bf16",
         "--quantization", "bf16"], {})
    assert cfg.format == "transformers" and cfg.task == "feature-extraction"
    assert cfg.max_batch_size == 8 and cfg.variant == "bf16" and cfg.quantization == "bf16"
    assert cfg.port == 8080 and cfg.batch_timeout_ms == 0
    assert cfg.name == "minilm"
    assert cfg.model_path == Path("/mnt/models")


def test_env_supplies_every_flag_and_cli_wins():
    env = {
        "KUBEMAAS_MODEL_URI": "file:///opt/model.pt",
        "KUBEMAAS_FORMAT": "torchscript",
        "KUBEMAAS_MAX_BATCH_SIZE": "16",
        "KUBEMAAS_BATCH_TIMEOUT_MS": "2.5",
        "KUBEMAAS_VARIANT": "int8",
        "KUBEMAAS_NAME": "from-env",
        "KUBEMAAS_PORT": "9000",
        "UNRELATED": "x",
    }
    cfg = parse_serve_config(["serve", "--port", "9100"], env)
    assert cfg.model_uri == "file:///opt/model.pt" and cfg.format == "torchscript"
    assert cfg.max_batch_size == 16 and cfg.batch_timeout_ms == 2.5
    assert cfg.variant == "int8" and cfg.name == "from-env"
    assert cfg.port == 9100
    assert cfg.model_path == Path("/opt/model.pt")


def test_every_flag_has_an_env_var():
    parser = build_serve_parser()
    flags = [a.option_strings[0] for a in parser._actions if a.dest != "help"]
    assert env_var_for("--max-batch-size") == "KUBEMAAS_MAX_BATCH_SIZE"
    for flag in ("--model-uri", "--format", "--task", "--architecture", "--name", "--variant",
                 "--quantization", "--device", "--max-batch-size", "--batch-timeout-ms",
                 "--max-queue", "--max-request-bytes", "--host", "--port", "--model-dir",
                 "--termination-log", "--max-drift", "--max-json-bytes", "--max-tensor-rank",
                 "--max-tensor-elements", "--max-string-bytes", "--max-buffered-bytes",
                 "--body-timeout-seconds", "--max-connections", "--max-header-bytes",
                 "--auth-token-file", "--engine", "--tensor-parallel-size", "--compile"):
        assert flag in flags



def test_every_flag_default_is_the_serve_configs_and_the_models_options_follow():
    """One default per setting: each flag's is ServeConfig's field default (argparse reads it
    from there), and what the model kinds and the vLLM engine take shares it."""
    import dataclasses

    from kubemaas_runtime.config import ServeConfig
    from kubemaas_runtime.generation.vllm_engine import VllmSettings
    from kubemaas_runtime.models.base import ModelOptions

    fields = {f.name: f for f in dataclasses.fields(ServeConfig)}
    checked = 0
    for action in build_serve_parser()._actions:
        if action.dest == "help" or action.dest not in fields:
            continue
        default = fields[action.dest].default
        if action.default is None:  # derived later (name from the URI) or truly optional
            assert default in (None, dataclasses.MISSING) or action.dest == "name", action.dest
            continue
        assert action.default == default, action.dest
        checked += 1
    assert checked >= 25
    options = ModelOptions(path=Path("/m"), name="m")
    for name in ("max_batch_size", "max_num_seqs", "max_num_batched_tokens", "max_queue", "variant",
                 "quantization", "compile"):
        assert getattr(options, name) == fields[name].default, name
    for name in ("max_num_seqs", "max_queue"):
        assert getattr(VllmSettings(), name) == fields[name].default, name

@pytest.mark.parametrize("argv, env", [
    (["--format", "torchscript"], {}),                                       # no URI
    (["--model-uri", "ftp://x/y", "--format", "torchscript"], {}),            # bad scheme
    (["--model-uri", "pvc://a/b", "--format", "onnx"], {}),                   # bad format
    (["--model-uri", "pvc://a/b", "--format", "transformers"], {}),           # no task
    (["--model-uri", "pvc://a/b", "--format", "safetensors"], {}),            # no architecture
    (["--model-uri", "pvc://a/b", "--format", "torchscript"], {"KUBEMAAS_MAX_BATCH_SIZE": "0"}),
    (["--model-uri", "pvc://a/b", "--format", "torchscript", "--quantization", "int3"], {}),
    (["--model-uri", "pvc://a/b", "--format", "gguf"], {"KUBEMAAS_ENGINE": "tensorrt"}),
    (["--model-uri", "pvc://a/b", "--format", "gguf", "--tensor-parallel-size", "0"], {}),
    (["--model-uri", "pvc://a/b", "--format", "gguf", "--task", "feature-extraction"], {}),
    (["--model-uri", "pvc://a/b", "--format", "torchscript", "--task", "text-generation"], {}),
    (["--model-uri", "pvc://a/b", "--format", "gguf"], {"KUBEMAAS_MAX_NUM_SEQS": "0"}),
    (["--model-uri", "pvc://a/b", "--format", "gguf"], {"KUBEMAAS_KV_CACHE_TOKENS": "-5"}),
    (["--model-uri", "pvc://a/b", "--format", "gguf", "--max-model-len", "x"], {}),
    (["--model-uri", "pvc://a/b", "--format", "gguf"], {"KUBEMAAS_COMPILE": "full"}),
    (["--model-uri", "pvc://a/b", "--format", "torchscript", "--max-request-bytes", "100",
      "--max-buffered-bytes", "10"], {}),                                    # budget < one body
    (["--model-uri", "pvc://a/b", "--format", "torchscript", "--body-timeout-seconds", "0"], {}),
])
def test_bad_input_exits(argv, env, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_serve_config(argv, env)
    assert exc.value.code == 2


def test_generation_flags_and_env():
    cfg = parse_serve_config(["--model-uri", "file:///m/smollm2.gguf", "--format", "gguf"], {})
    assert cfg.task == "text-generation"  # the only task a GGUF file serves
    assert cfg.max_model_len is None and cfg.kv_cache_tokens is None and cfg.max_num_seqs == 16
    env = {"KUBEMAAS_MODEL_URI": "pvc://models/llm", "KUBEMAAS_FORMAT": "transformers",
           "KUBEMAAS_TASK": "text-generation", "KUBEMAAS_MAX_MODEL_LEN": "2048",
           "KUBEMAAS_MAX_NUM_SEQS": "8", "KUBEMAAS_KV_CACHE_TOKENS": "8192"}
    cfg = parse_serve_config(["--max-num-seqs", "4"], env)
    assert (cfg.task, cfg.max_model_len, cfg.max_num_seqs, cfg.kv_cache_tokens) == (
        "text-generation", 2048, 4, 8192)
    assert cfg.compile == "off"
    cfg = parse_serve_config([], {**env, "KUBEMAAS_COMPILE": "decode"})
    assert cfg.compile == "decode"


def test_uri_mapping():
    assert model_path_for_uri("pvc://claim/some/path", "/mnt/models") == Path("/mnt/models")
    assert model_path_for_uri("s3://bucket/key", "/data") == Path("/data")
    assert model_path_for_uri("hf://org/name", "/mnt/models") == Path("/mnt/models")
    assert model_path_for_uri("file:///abs/dir") == Path("/abs/dir")
    assert default_model_name("hf://sentence-transformers/all-MiniLM-L6-v2") == "all-MiniLM-L6-v2"
    assert default_model_name("file:///models/net.pt2") == "net"


def test_metrics_contract_names():
    metrics = create_metrics()
    metrics.bind("m", "default").requests.inc()
    names = exposed_sample_names(metrics.registry)
    for name in ("kubemaas_inflight_requests", "kubemaas_requests_total",
                 "kubemaas_request_duration_seconds_bucket", "kubemaas_queue_wait_seconds_bucket",
                 "kubemaas_inference_seconds_bucket", "kubemaas_batch_size_bucket",
                 "kubemaas_queue_depth", "kubemaas_model_load_seconds",
                 "kubemaas_num_requests_running", "kubemaas_num_requests_waiting",
                 "kubemaas_kv_cache_usage_ratio", "kubemaas_time_to_first_token_seconds_bucket",
                 "kubemaas_inter_token_latency_seconds_bucket", "kubemaas_prompt_tokens_total",
                 "kubemaas_generation_tokens_total"):
        assert name in names
    assert metrics.registry.get_sample_value(
        "kubemaas_requests_total", {"model": "m", "variant": "default"}) == 1
    create_metrics()  # a second set never collides with the first
