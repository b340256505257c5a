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
DISTRIBUTED_EXECUTOR_BACKENDS = ("ray", "mp")
QUANTIZATIONS = ("none", "fp16", "bf16", "int8-dynamic", "int8-weight-only", "int4-weight-only")
DEVICES = ("auto", "cpu", "cuda")
ENGINES = ("auto", "builtin", "vllm")
COMPILE_MODES = ("off", "decode")  # generation/compiled_decode.py (not imported: it loads torch)
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
    # hostile-input limits (docs/runtime.md, "Limits and hostile input")
    max_json_bytes: int = 8 * 1024 * 1024
    max_tensor_rank: int = 8
    max_tensor_elements: int = 1 << 24
    max_string_bytes: int = 64 * 1024
    max_buffered_bytes: int = 512 * 1024 * 1024
    body_timeout_seconds: float = 30.0
    max_connections: int = 1024
    max_header_bytes: int = 64 * 1024
    auth_token_file: str | None = None
    host: str = "0.0.0.0"
    port: int = 8080
    model_dir: str = DEFAULT_MODEL_DIR
    termination_log: str = "/dev/termination-log"
    max_drift: float | None = None
    drain_seconds: float = 25.0
    unready_delay_seconds: float = 0.0
    log_level: str = "info"
    # text-generation (docs/runtime.md "Generation limits"); None: from the model / derived
    max_model_len: int | None = None
    max_num_seqs: int = 16
    kv_cache_tokens: int | None = None
    kv_cache_memory: int | None = None  # bytes
    max_num_batched_tokens: int = 512
    compile: str = "off"  # the builtin engine's compiled decode (docs/runtime.md)
    # which engine serves the model (docs/runtime.md "Engines and GPUs"), and the GPUs one
    # model is split over (None: every visible GPU)
    engine: str = "auto"
    tensor_parallel_size: int | None = None
    # LoRA adapters of a text-generation model (docs/runtime.md "LoRA adapters")
    max_loras: int = 0
    max_lora_rank: int = 16
    adapters: str | None = None
    adapters_config: str | None = None
    adapter_dir: str = "/mnt/adapters"
    # a model larger than one node (docs/runtime.md "Engines and GPUs"): vLLM's stages over
    # nodes and the executor that reaches them (ray: the RayCluster the operator renders)
    pipeline_parallel_size: int = 1
    distributed_executor_backend: str | None = None

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


_BYTE_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "ki": 2**10, "mi": 2**20,
               "gi": 2**30}


def _byte_size(text: str) -> int:
    """Bytes, with an optional unit as Kubernetes writes them: 512Mi, 2Gi, 1G, 100000."""
    match = re.fullmatch(r"\s*(\d+)\s*([KkMmGg]i?)?\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size in bytes (e.g. 512Mi, 2Gi): {text!r}")
    value = int(match.group(1)) * _BYTE_UNITS[(match.group(2) or "").lower()]
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1 byte, got {text!r}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _static_adapters(text: str) -> str:
    from kubemaas_runtime.generation.adapter_sync import parse_static_adapters

    try:
        parse_static_adapters(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
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
    add("--variant", default=ServeConfig.variant, help="variant label for metrics and metadata")
    add("--quantization", choices=QUANTIZATIONS, default=ServeConfig.quantization,
        help="quantization applied after loading")
    add("--device", choices=DEVICES, default=ServeConfig.device, help="auto picks cuda when available")
    add("--max-batch-size", type=_positive_int, default=ServeConfig.max_batch_size,
        help="most rows one forward pass takes")
    add("--batch-timeout-ms", type=_non_negative_float, default=ServeConfig.batch_timeout_ms,
        help="extra wait for a batch to fill; 0 runs at once when the model is idle")
    add("--max-queue", type=_positive_int, default=ServeConfig.max_queue,
        help="most requests waiting for the model; beyond it requests get 503 + Retry-After")
    add("--max-request-bytes", type=_positive_int, default=ServeConfig.max_request_bytes,
        help="largest request body; larger ones get 413")
    add_limit_arguments(parser)
    add("--host", default=ServeConfig.host, help="address to listen on")
    add("--port", type=_positive_int, default=ServeConfig.port, help="HTTP port")
    add("--model-dir", default=ServeConfig.model_dir,
        help="local directory holding the files of pvc://, s3:// and hf:// models")
    add("--termination-log", default=ServeConfig.termination_log,
        help="file receiving the one-line reason when the model fails to start")
    add("--max-drift", type=_non_negative_float,
        help="largest accepted drift of a quantized variant from full precision on the probes (1 - min cosine, or share of changed labels); above it the process exits with QuantizationDriftExceeded")
    add("--drain-seconds", type=_non_negative_float, default=ServeConfig.drain_seconds,
        help="after SIGTERM, the longest the server waits for in-flight and queued requests "
             "before it exits; requests still queued 1 s before the end get 503 + Retry-After "
             "(the operator sets it from its drainSeconds, which also sizes the pod's grace period)")
    add("--unready-delay-seconds", type=_non_negative_float, default=ServeConfig.unready_delay_seconds,
        help="after SIGTERM keep accepting this long with readiness false before closing (in "
             "Kubernetes the pod's preStop pause does this)")
    add("--max-model-len", type=_positive_int,
        help="text-generation: longest context (prompt + generated tokens) of one sequence; "
             "default: the model's max_position_embeddings")
    add("--max-num-seqs", type=_positive_int, default=ServeConfig.max_num_seqs,
        help="text-generation: most sequences decoded together in the running batch")
    add("--kv-cache-tokens", type=_positive_int,
        help="text-generation: KV-cache token budget over all running sequences (each reserves "
             "its prompt + max_tokens); past it requests wait in the queue (--max-queue). "
             "Default: max-num-seqs x max-model-len (capped by memory, see --kv-cache-memory)")
    add("--kv-cache-memory", type=_byte_size,
        help="text-generation: bytes of the builtin engine's paged KV cache (512Mi, 2Gi); the "
             "token budget is what fits. With --kv-cache-tokens too, the smaller budget wins. "
             "Default: the --kv-cache-tokens default, capped at half the free memory of the "
             "device")
    add("--max-num-batched-tokens", type=_positive_int, default=ServeConfig.max_num_batched_tokens,
        help="text-generation: most tokens in one engine step (each decoding sequence's next "
             "token first, then prompt chunks in arrival order)")
    add("--compile", choices=COMPILE_MODES, default=ServeConfig.compile,
        help="text-generation, builtin engine: decode runs the pure-decode steps through "
             "torch.compile (inductor) at batch buckets 1, 2, 4, ... up to --max-num-seqs, "
             "compiled before the server is ready (tens of seconds per bucket on a small CPU); "
             "other steps, and LoRA, stay eager. off: eager only")
    add("--engine", choices=ENGINES, default=ServeConfig.engine,
        help="the engine that runs a text-generation model: vllm (vLLM in this process; needs "
             "vLLM installed, --format transformers and an architecture in vLLM's registry, "
             "else the start fails with ModelLoadFailed), builtin (the project's PyTorch "
             "engine: GGUF, CPU images without vLLM, any causal LM), or auto (vllm when all "
             "of vllm's conditions hold, else builtin; the log says why)")
    add("--tensor-parallel-size", type=_positive_int,
        help="GPUs one model is split over (tensor parallel), passed to vLLM; default: every "
             "visible GPU (1 on CPU). The builtin engine splits over none: above 1 (or with "
             "several GPUs visible) it fails at start with ModelLoadFailed, for every task")
    add("--max-loras", type=_non_negative_int, default=ServeConfig.max_loras,
        help="text-generation: most LoRA adapters loaded at once (vLLM's --max-loras); 0 "
             "turns adapters off (and /v1/load_lora_adapter with them)")
    add("--max-lora-rank", type=_positive_int, default=ServeConfig.max_lora_rank,
        help="text-generation: largest LoRA rank an adapter may have (vLLM's "
             "--max-lora-rank); a larger one is refused with 400 naming 'r'")
    add("--adapters", type=_static_adapters, metavar="NAME=PATH[,NAME=PATH...]",
        help="text-generation: LoRA adapter directories loaded at start, each served as the "
             "model NAME (needs --max-loras)")
    add("--adapters-config", metavar="FILE",
        help="text-generation: a JSON list of {name, uri} watched while serving: adapters it "
             "adds are loaded, those it drops unloaded, without a restart (the operator's "
             "ConfigMap)")
    add("--adapter-dir", default=ServeConfig.adapter_dir,
        help="text-generation: where s3:// and hf:// adapters of --adapters-config are "
             "fetched to, one directory per name (the pod's adapter-fetch container)")
    add("--pipeline-parallel-size", type=_positive_int, default=ServeConfig.pipeline_parallel_size,
        help="nodes one model is split over (pipeline parallel, one stage per node), passed to "
             "vLLM; above 1 needs --engine vllm and --distributed-executor-backend ray (the "
             "operator sets both for resources.gpu.nodes > 1)")
    add("--distributed-executor-backend", choices=DISTRIBUTED_EXECUTOR_BACKENDS,
        help="how vLLM reaches GPUs beyond this process: ray (a Ray cluster this pod joined, "
             "its head started by KubeRay) or mp (processes on this node); default: vLLM's choice")
    add("--log-level", choices=("debug", "info", "warning", "error"), default=ServeConfig.log_level,
        help="log verbosity")
    _mention_env_vars(parser)


def add_limit_arguments(parser: argparse.ArgumentParser) -> None:
    """What one request, and all of them together, may cost (docs/runtime.md)."""
    add = parser.add_argument
    add("--max-json-bytes", type=_positive_int, default=ServeConfig.max_json_bytes,
        help="largest JSON part of a request (all of a JSON request, the header of a binary "
             "one); larger gets 413")
    add("--max-tensor-rank", type=_positive_int, default=ServeConfig.max_tensor_rank,
        help="most dimensions an input may declare; more gets 400")
    add("--max-tensor-elements", type=_positive_int, default=ServeConfig.max_tensor_elements,
        help="most elements one input may declare; more gets 400")
    add("--max-string-bytes", type=_positive_int, default=ServeConfig.max_string_bytes,
        help="longest BYTES element (one text), refused with 400 before tokenizing")
    add("--max-buffered-bytes", type=_positive_int, default=ServeConfig.max_buffered_bytes,
        help="memory budget of every request's body and decoded tensors together; a request "
             "that would pass it gets 503 + Retry-After")
    add("--body-timeout-seconds", type=_positive_float, default=ServeConfig.body_timeout_seconds,
        help="a request's headers, and then its body, must arrive within this; else 408 / "
             "closed")
    add("--max-connections", type=_positive_int, default=ServeConfig.max_connections,
        help="most open connections and requests at once (uvicorn limit_concurrency); "
             "beyond, 503")
    add("--max-header-bytes", type=_positive_int, default=ServeConfig.max_header_bytes,
        help="largest request line plus headers; larger gets 400 and the connection closed")
    add("--auth-token-file",
        help="file holding a bearer token; when set, /v2/models/* and /v1/* need "
             "'Authorization: Bearer <token>' (401 otherwise); health and /metrics stay open")


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
    if ns.max_buffered_bytes < ns.max_request_bytes:
        parser.error(f"--max-buffered-bytes ({ns.max_buffered_bytes}) must be at least "
                     f"--max-request-bytes ({ns.max_request_bytes})")
    if (ns.adapters or ns.adapters_config) and not ns.max_loras:
        parser.error("--adapters and --adapters-config need --max-loras >= 1")
    if ns.pipeline_parallel_size > 1 and ns.engine == "builtin":
        parser.error("--pipeline-parallel-size above 1 needs --engine vllm (the builtin engine "
                     "runs a model on one device)")
    values = vars(ns)
    if not values["name"]:
        values["name"] = default_model_name(ns.model_uri)
    return ServeConfig(**values)
