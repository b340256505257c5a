"""The `serve` command line: every flag also read from its KUBEMAAS_* environment variable.

Environment values are turned into arguments placed *before* the real command line, so argparse
validates both the same way and the command line wins (last occurrence of a flag wins).
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlparse

FORMATS = ("torchscript", "exported-program", "safetensors", "transformers", "gguf")
TASKS = ("feature-extraction", "text-classification", "text-generation")
QUANTIZATIONS = ("none", "fp16", "bf16", "int8-dynamic", "int8-weight-only", "int4-weight-only")
DEVICES = ("auto", "cpu", "cuda")
URI_SCHEMES = ("pvc", "file", "s3", "hf")
ENV_PREFIX = "KUBEMAAS_"
DEFAULT_MODEL_DIR = "/mnt/models"


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    model_uri: str
    format: str
    task: str | None = None
    architecture: str | None = None
    name: str = "model"
    variant: str = "default"
    quantization: str = "none"
    device: str = "auto"
    max_batch_size: int = 32
    batch_timeout_ms: float = 0.0
    max_queue: int = 256
    max_request_bytes: int = 64 * 1024 * 1024
    host: str = "0.0.0.0"
    port: int = 8080
    model_dir: str = DEFAULT_MODEL_DIR
    termination_log: str = "/dev/termination-log"
    max_drift: float | None = None
    drain_seconds: float = 0.0
    graceful_timeout_seconds: float = 25.0
    log_level: str = "info"
    # text-generation (docs/runtime.md "Generation limits"); None: from the model / derived
    max_model_len: int | None = None
    max_num_seqs: int = 16
    kv_cache_tokens: int | None = None

    @property
    def model_path(self) -> Path:
        return model_path_for_uri(self.model_uri, self.model_dir)


def model_path_for_uri(uri: str, model_dir: str = DEFAULT_MODEL_DIR) -> Path:
    """Where the model files of `uri` are inside the container.

    file:///abs/path -> /abs/path (files baked into the image); a bare path is used as it is.
    pvc://, s3:// and hf:// -> `model_dir` (/mnt/models): the operator mounts the claim's
    sub-path there, or the fetch init container fills it.
    """
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return Path(parsed.path)
    if parsed.scheme in ("pvc", "s3", "hf"):
        return Path(model_dir)
    if parsed.scheme == "":
        return Path(uri)
    raise ValueError(f"unsupported model URI scheme '{parsed.scheme}' (use one of {URI_SCHEMES})")


def default_model_name(uri: str) -> str:
    """The last path segment of the URI without extension, as a v2 model name."""
    parsed = urlparse(uri)
    segments = [s for s in (parsed.netloc + parsed.path).split("/") if s]
    if not segments:
        return "model"
    stem = segments[-1].split("@")[0].split(".")[0]
    cleaned = re.sub(r"[^A-Za-z0-9_.-]", "-", stem).strip("-.")
    return cleaned or "model"


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _model_uri(text: str) -> str:
    try:
        model_path_for_uri(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def env_var_for(flag: str) -> str:
    """`--max-batch-size` -> `KUBEMAAS_MAX_BATCH_SIZE`."""
    return ENV_PREFIX + flag.lstrip("-").replace("-", "_").upper()


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--model-uri", type=_model_uri, required=True,
        help="where the model comes from: pvc://claim/path, file:///abs/path, s3://bucket/key, "
             "hf://org/name; pvc/s3/hf are read from --model-dir, file:// from its path")
    add("--format", choices=FORMATS, required=True, help="how the model files are stored")
    add("--task", choices=TASKS, help="for --format transformers: what the model computes")
    add("--architecture", metavar="MODULE:FACTORY",
        help="for --format safetensors: importable factory returning the torch.nn.Module")
    add("--name", help="model name in /v2/models/{name} (default: last segment of the URI)")
    add("--variant", default="default", help="variant label for metrics and metadata")
    add("--quantization", choices=QUANTIZATIONS, default="none",
        help="quantization applied after loading")
    add("--device", choices=DEVICES, default="auto", help="auto picks cuda when available")
    add("--max-batch-size", type=_positive_int, default=32,
        help="most rows one forward pass takes")
    add("--batch-timeout-ms", type=_non_negative_float, default=0.0,
        help="extra wait for a batch to fill; 0 runs at once when the model is idle")
    add("--max-queue", type=_positive_int, default=256,
        help="most requests waiting for the model; beyond it requests get 503 + Retry-After")
    add("--max-request-bytes", type=_positive_int, default=64 * 1024 * 1024,
        help="largest request body; larger ones get 413")
    add("--host", default="0.0.0.0", help="address to listen on")
    add("--port", type=_positive_int, default=8080, help="HTTP port")
    add("--model-dir", default=DEFAULT_MODEL_DIR,
        help="local directory holding the files of pvc://, s3:// and hf:// models")
    add("--termination-log", default="/dev/termination-log",
        help="file receiving the one-line reason when the model fails to start")
    add("--max-drift", type=_non_negative_float,
        help="largest accepted drift of a quantized variant from full precision on the probes (1 - min cosine, or share of changed labels); above it the process exits with QuantizationDriftExceeded")
    add("--drain-seconds", type=_non_negative_float, default=0.0,
        help="after SIGTERM keep serving this long with readiness false before closing")
    add("--graceful-timeout-seconds", type=_non_negative_float, default=25.0,
        help="after closing, longest wait for in-flight requests")
    add("--max-model-len", type=_positive_int,
        help="text-generation: longest context (prompt + generated tokens) of one sequence; "
             "default: the model's max_position_embeddings")
    add("--max-num-seqs", type=_positive_int, default=16,
        help="text-generation: most sequences decoded together in the running batch")
    add("--kv-cache-tokens", type=_positive_int,
        help="text-generation: KV-cache token budget over all running sequences (each reserves "
             "its prompt + max_tokens); past it requests wait in the queue (--max-queue). "
             "Default: max-num-seqs x max-model-len")
    add("--log-level", choices=("debug", "info", "warning", "error"), default="info",
        help="log verbosity")
    _mention_env_vars(parser)


def _mention_env_vars(parser: argparse.ArgumentParser) -> None:
    for action in parser._actions:
        long_flags = [s for s in action.option_strings if s.startswith("--")]
        if long_flags and action.dest != "help":
            action.help = f"{action.help} [env {env_var_for(long_flags[0])}]"


def build_serve_parser(prog: str = "kubemaas-runtime serve") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Serve one PyTorch model over the Open Inference Protocol (KServe v2). "
                    "Every flag can also be set with its KUBEMAAS_* environment variable "
                    "(--max-batch-size <-> KUBEMAAS_MAX_BATCH_SIZE); the command line wins.",
    )
    add_serve_arguments(parser)
    return parser


def env_arguments(parser: argparse.ArgumentParser, env: Mapping[str, str]) -> list[str]:
    """Turn the KUBEMAAS_* variables of `env` into `--flag value` pairs."""
    args: list[str] = []
    for action in parser._actions:  # argparse exposes no public iterator over its actions
        long_flags = [s for s in action.option_strings if s.startswith("--")]
        if not long_flags or action.dest == "help":
            continue
        value = env.get(env_var_for(long_flags[0]))
        if value is not None and value != "":
            args += [long_flags[0], value]
    return args


def parse_serve_config(argv: list[str], env: Mapping[str, str]) -> ServeConfig:
    """Parse `serve` arguments and KUBEMAAS_* env into a ServeConfig (a leading "serve" is
    skipped, so a container's args can be passed as they are).

    Raises SystemExit (argparse style) on bad input.
    """
    argv = list(argv)
    if argv[:1] == ["serve"]:  # container args may keep the subcommand
        argv = argv[1:]
    parser = build_serve_parser()
    ns = parser.parse_args(env_arguments(parser, env) + list(argv))
    if ns.format == "transformers" and ns.task is None:
        parser.error(f"--format transformers needs --task (one of {', '.join(TASKS)})")
    if ns.format == "gguf" and ns.task not in (None, "text-generation"):
        parser.error("--format gguf serves --task text-generation only")
    if ns.format == "gguf":
        ns.task = "text-generation"
    if ns.task == "text-generation" and ns.format not in ("transformers", "gguf"):
        parser.error("--task text-generation needs --format transformers or gguf")
    if ns.format == "safetensors" and not ns.architecture:
        parser.error("--format safetensors needs --architecture module:factory")
    if ns.architecture and ":" not in ns.architecture:
        parser.error("--architecture must look like package.module:factory")
    values = vars(ns)
    if not values["name"]:
        values["name"] = default_model_name(ns.model_uri)
    return ServeConfig(**values)
