"""Prometheus metrics of the runtime, labelled by model and variant.

`create_metrics()` builds them in a registry of their own (never the process-global one), so
tests and tools can create as many as they like.
"""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LABELS = ("model", "variant")
# Latency buckets from half a millisecond to half a minute.
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256,
                   0.512, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
# Time to first token spans queueing and a prefill: up to a minute.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
INTER_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075,
                       0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)


class RuntimeMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.inflight_requests = Gauge(
            "kubemaas_inflight_requests", "Inference requests being handled now",
            LABELS, registry=registry)
        self.requests_total = Counter(
            "kubemaas_requests_total", "Inference requests handled", LABELS, registry=registry)
        self.request_failures_total = Counter(
            "kubemaas_request_failures_total", "Inference requests answered with an error, by status",
            LABELS + ("code",), registry=registry)
        self.request_duration_seconds = Histogram(
            "kubemaas_request_duration_seconds", "Whole inference request time",
            LABELS, buckets=LATENCY_BUCKETS, registry=registry)
        self.queue_wait_seconds = Histogram(
            "kubemaas_queue_wait_seconds", "Time a request waited for its batch to start",
            LABELS, buckets=LATENCY_BUCKETS, registry=registry)
        self.inference_seconds = Histogram(
            "kubemaas_inference_seconds", "Time of one batched forward pass",
            LABELS, buckets=LATENCY_BUCKETS, registry=registry)
        self.batch_size = Histogram(
            "kubemaas_batch_size", "Rows per batched forward pass",
            LABELS, buckets=BATCH_BUCKETS, registry=registry)
        self.queue_depth = Gauge(
            "kubemaas_queue_depth", "Requests waiting for the model", LABELS, registry=registry)
        self.model_load_seconds = Gauge(
            "kubemaas_model_load_seconds", "Time taken to load and warm up the model",
            LABELS, registry=registry)
        self.model_ready = Gauge(
            "kubemaas_model_ready", "1 when the model serves requests", LABELS, registry=registry)
        self.quantization_info = Gauge(
            "kubemaas_quantization_info", "1 for the quantization method actually applied",
            LABELS + ("method", "backend"), registry=registry)
        self.engine_info = Gauge(
            "kubemaas_engine_info", "1 for the engine that serves the model (--engine) and the "
            "GPUs one copy of it is split over", LABELS + ("engine", "tensor_parallel_size"),
            registry=registry)
        self.quantization_drift = Gauge(
            "kubemaas_quantization_drift",
            "Drift of the variant from full precision on the probes, measured at start",
            LABELS, registry=registry)

        # text-generation (docs/runtime.md "Generation metrics": the vLLM names they match)
        self.num_requests_running = Gauge(
            "kubemaas_num_requests_running", "Sequences in the running (decoding) batch",
            LABELS, registry=registry)
        self.num_requests_waiting = Gauge(
            "kubemaas_num_requests_waiting", "Generation requests waiting for a running slot",
            LABELS, registry=registry)
        self.kv_cache_usage_ratio = Gauge(
            "kubemaas_kv_cache_usage_ratio",
            "Share (0..1) of the KV-cache token budget reserved by running sequences",
            LABELS, registry=registry)
        self.time_to_first_token_seconds = Histogram(
            "kubemaas_time_to_first_token_seconds",
            "From a generation request's arrival to its first generated token",
            LABELS, buckets=TTFT_BUCKETS, registry=registry)
        self.inter_token_latency_seconds = Histogram(
            "kubemaas_inter_token_latency_seconds",
            "Time between two consecutive generated tokens of one sequence",
            LABELS, buckets=INTER_TOKEN_BUCKETS, registry=registry)
        self.prompt_tokens_total = Counter(
            "kubemaas_prompt_tokens_total", "Prompt tokens prefilled", LABELS, registry=registry)
        self.generation_tokens_total = Counter(
            "kubemaas_generation_tokens_total", "Tokens generated", LABELS, registry=registry)
        self.prefix_cache_queries_total = Counter(
            "kubemaas_prefix_cache_queries_total",
            "Prompt tokens looked up in the prefix cache", LABELS, registry=registry)
        self.prefix_cache_hits_total = Counter(
            "kubemaas_prefix_cache_hits_total",
            "Prompt tokens found in the prefix cache (not prefilled again)", LABELS,
            registry=registry)

        # LoRA adapters (docs/runtime.md "LoRA adapters"): one series whose labels name the
        # adapters of running and of waiting sequences, valued with the time it was set; the
        # vLLM name as vLLM writes it (the endpoint picker reads it), and the project's
        lora_labels = ("running_lora_adapters", "waiting_lora_adapters", "max_lora")
        self.vllm_lora_requests_info = Gauge(
            "vllm:lora_requests_info", "Running and waiting LoRA adapters (vLLM's shape)",
            lora_labels, registry=registry)
        self.lora_requests_info = Gauge(
            "kubemaas_lora_requests_info", "Running and waiting LoRA adapters (comma-separated "
            "names), valued with the Unix time they were set", LABELS + lora_labels,
            registry=registry)

    def bind(self, model: str, variant: str) -> BoundMetrics:
        return BoundMetrics(self, model, variant)


class BoundMetrics:
    """The metric children of one model/variant, looked up once (the hot path skips labels())."""

    def __init__(self, metrics: RuntimeMetrics, model: str, variant: str) -> None:
        self.metrics = metrics
        self._labels = (model, variant)
        self.inflight = metrics.inflight_requests.labels(model, variant)
        self.requests = metrics.requests_total.labels(model, variant)
        self.duration = metrics.request_duration_seconds.labels(model, variant)
        self.queue_wait = metrics.queue_wait_seconds.labels(model, variant)
        self.inference = metrics.inference_seconds.labels(model, variant)
        self.batch_size = metrics.batch_size.labels(model, variant)
        self.queue_depth = metrics.queue_depth.labels(model, variant)
        self.load_seconds = metrics.model_load_seconds.labels(model, variant)
        self.ready = metrics.model_ready.labels(model, variant)
        self.running = metrics.num_requests_running.labels(model, variant)
        self.waiting = metrics.num_requests_waiting.labels(model, variant)
        self.kv_cache_usage = metrics.kv_cache_usage_ratio.labels(model, variant)
        self.ttft = metrics.time_to_first_token_seconds.labels(model, variant)
        self.inter_token = metrics.inter_token_latency_seconds.labels(model, variant)
        self.prompt_tokens = metrics.prompt_tokens_total.labels(model, variant)
        self.generation_tokens = metrics.generation_tokens_total.labels(model, variant)
        self.prefix_cache_queries = metrics.prefix_cache_queries_total.labels(model, variant)
        self.prefix_cache_hits = metrics.prefix_cache_hits_total.labels(model, variant)

    def record_quantization(self, method: str, backend: str, drift: float | None) -> None:
        self.metrics.quantization_info.labels(*self._labels, method, backend).set(1)
        if drift is not None:
            self.metrics.quantization_drift.labels(*self._labels).set(drift)

    def record_engine(self, engine: str, tensor_parallel_size: int) -> None:
        self.metrics.engine_info.labels(*self._labels, engine, str(tensor_parallel_size)).set(1)

    def failure(self, code: int) -> None:
        self.metrics.request_failures_total.labels(*self._labels, str(code)).inc()

    # BatchObserver
    def observe_batch(self, rows: int, queue_waits: Sequence[float], run_seconds: float) -> None:
        self.batch_size.observe(rows)
        self.inference.observe(run_seconds)
        for wait in queue_waits:
            self.queue_wait.observe(wait)

    def observe_queue_depth(self, depth: int) -> None:
        self.queue_depth.set(depth)


def create_metrics(registry: CollectorRegistry | None = None) -> RuntimeMetrics:
    """Create every runtime metric in `registry` (a new one when None)."""
    return RuntimeMetrics(registry if registry is not None else CollectorRegistry())


def exposed_sample_names(registry: CollectorRegistry) -> set[str]:
    """Every sample name the registry exposes (`kubemaas_requests_total`, `..._bucket`, ...).

    Counters are collected under their family name without `_total`; this lists what
    Prometheus (and so an HPA or ScaledObject query) actually sees.
    """
    names: set[str] = set()
    for family in registry.collect():
        names.add(family.name)
        if family.type == "counter":
            names.add(family.name + "_total")
        for sample in family.samples:
            names.add(sample.name)
    return names
