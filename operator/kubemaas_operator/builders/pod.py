"""The pod template of a variant: the runtime container, probes, security, scheduling."""

from __future__ import annotations

import copy
from typing import Any

from kubemaas_operator import gpufit, placement
from kubemaas_operator.api import ModelService, Variant
from kubemaas_operator.builders import model_cache
from kubemaas_operator.builders.adapters import (
    adapter_env,
    adapter_fetch_sidecar,
    adapter_mounts,
    adapter_volumes,
    wants_adapters,
)
from kubemaas_operator.builders.auth import auth_args, auth_mounts, auth_volumes
from kubemaas_operator.builders.model_source import (
    MODEL_VOLUME,
    TMP_VOLUME,
    ModelMount,
    fetch_init_container,
    model_mount,
)
from kubemaas_operator.builders.naming import (
    FETCH_CONTAINER,
    RUNTIME_CONTAINER,
    variant_labels,
)
from kubemaas_operator.engine import compiles_decode, resolved_engine, tensor_parallel_size
from kubemaas_operator.runtime_contract import (
    COMPILE_DECODE,
    COMPILE_FLAG,
    HTTP_PORT,
    LIVE_PATH,
    MODEL_DIR,
    READY_PATH,
    env_name,
)
from kubemaas_operator.settings import OperatorSettings

PRE_STOP_SLEEP_SECONDS = 5  # lets endpoints drop the pod before it stops taking requests
PROBE_PERIOD_SECONDS = 5

RUNTIME_UID = 65532  # the runtime image's non-root user

# /dev/shm (docs/api.md, "Engines"): vLLM's worker processes and NCCL's shared-memory transport
# between a pod's GPUs need more than the container runtime's 64 MiB default.
SHM_VOLUME = "dshm"
SHM_BASE_GIB = 1  # vLLM's message queues and PyTorch's IPC
SHM_PER_GPU_GIB = 1  # NCCL buffers per GPU of the split (its SHM transport)


def shm_size_limit(ms: ModelService, variant: Variant) -> str | None:
    """The /dev/shm emptyDir's size for a vLLM variant or a split over GPUs, else None (no volume)."""
    split = tensor_parallel_size(ms) if ms.spec.uses_gpu else 1
    if resolved_engine(ms, variant) != "vllm" and split <= 1:
        return None
    # whole GiB, in the API server's canonical form (it would store 3072Mi as 3Gi)
    return f"{SHM_BASE_GIB + SHM_PER_GPU_GIB * (split if split > 1 else 0)}Gi"


def container_security_context() -> dict[str, Any]:
    """The restricted Pod Security Standard, per container (fresh dict: callers may mutate)."""
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def with_node_cache(ms: ModelService, source: ModelMount, init_containers: list[dict[str, Any]]
                    ) -> tuple[ModelMount, list[dict[str, Any]]]:
    """spec.model.cache node: the node's cache claim instead of the model emptyDir; the fetch
    step fills (or finds) `/cache/<key>` with --cache, the runtime mounts that entry read-only."""
    volume = model_cache.cache_pod_volume(ms)
    source = ModelMount(volumes=[volume if v["name"] == MODEL_VOLUME else v for v in source.volumes],
                        mounts=[model_cache.cache_runtime_mount(ms) if m["name"] == MODEL_VOLUME else m
                                for m in source.mounts],
                        fetch=source.fetch)
    fetched = []
    for container in init_containers:
        if container["name"] == FETCH_CONTAINER:
            container = copy.deepcopy(container)
            args = container["args"]
            at = args.index("--dest")
            container["args"] = [*args[:at], *model_cache.cache_fetch_args(ms), *args[at + 2:]]
            container["volumeMounts"] = [model_cache.cache_fetch_mount() if m["name"] == MODEL_VOLUME else m
                                         for m in container["volumeMounts"]]
        fetched.append(container)
    return source, fetched


def pod_security_context() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": RUNTIME_UID,
        "runAsGroup": RUNTIME_UID,
        "fsGroup": RUNTIME_UID,  # the model emptyDir is writable by the fetch step
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def runtime_env(ms: ModelService, variant: Variant, settings: OperatorSettings) -> list[dict[str, str]]:
    """The runtime's configuration, one KUBEMAAS_* variable per `kubemaas-runtime serve` flag."""
    spec = ms.spec
    values: dict[str, str | None] = {
        "KUBEMAAS_MODEL_URI": spec.model.uri,
        "KUBEMAAS_FORMAT": spec.model.format,
        "KUBEMAAS_TASK": spec.model.runtime_task,
        "KUBEMAAS_ARCHITECTURE": spec.model.architecture,
        "KUBEMAAS_NAME": ms.name,
        "KUBEMAAS_VARIANT": variant.name,
        "KUBEMAAS_QUANTIZATION": variant.quantization,
        "KUBEMAAS_DEVICE": "cuda" if spec.uses_gpu else "cpu",
        "KUBEMAAS_MAX_BATCH_SIZE": str(spec.runtime.max_batch_size),
        "KUBEMAAS_BATCH_TIMEOUT_MS": str(spec.runtime.batch_timeout_ms),
        "KUBEMAAS_MAX_DRIFT": None if spec.runtime.max_drift is None else str(spec.runtime.max_drift),
        **engine_env(ms, variant),
        **generation_env(ms),
        **(adapter_env() if wants_adapters(ms) else {}),
        "KUBEMAAS_PORT": str(HTTP_PORT),
        "KUBEMAAS_MODEL_DIR": MODEL_DIR,
        # one name on both sides: the operator's drain_seconds is the runtime's --drain-seconds
        "KUBEMAAS_DRAIN_SECONDS": str(settings.drain_seconds),
        # Libraries that cache under $HOME write to the writable /tmp (the root is read-only).
        "HOME": "/tmp",
    }
    return [{"name": name, "value": value} for name, value in values.items() if value is not None]


def engine_env(ms: ModelService, variant: Variant) -> dict[str, str | None]:
    """The engine as the spec asks for it (auto, the runtime's default, is not written), the
    GPUs one copy of the model is split over, when that is more than one or set in the spec, and
    compiled decode when the variant asks for it (off, the runtime's default, is not written)."""
    spec = ms.spec
    engine = spec.engine_of(variant)
    split = spec.runtime.tensor_parallel_size
    if split is None and spec.resources.gpu.count > 1:
        split = spec.resources.gpu.count
    return {
        "KUBEMAAS_ENGINE": None if engine == "auto" else engine,
        "KUBEMAAS_TENSOR_PARALLEL_SIZE": None if split is None else str(split),
        env_name(COMPILE_FLAG): COMPILE_DECODE if compiles_decode(ms, variant) else None,
    }


def generation_env(ms: ModelService) -> dict[str, str | None]:
    """A text-generation model's limits; the KV budget the GPU-fit estimate assumed when the
    spec sets none that bounds it (gpufit.operator_kv_cache_tokens)."""
    runtime = ms.spec.runtime
    kv_tokens = runtime.kv_cache_tokens or gpufit.operator_kv_cache_tokens(ms)
    as_text = lambda value: None if value is None else str(value)
    return {
        "KUBEMAAS_MAX_MODEL_LEN": as_text(runtime.max_model_len),
        "KUBEMAAS_MAX_NUM_SEQS": as_text(runtime.max_num_seqs),
        "KUBEMAAS_KV_CACHE_TOKENS": as_text(kv_tokens),
    }


def container_resources(ms: ModelService, settings: OperatorSettings, with_gpu: bool) -> dict[str, Any]:
    """Requests from spec.resources; memory is also the limit, and every container has one (the
    operator's runtime_memory_limit when the spec names none); GPUs are limits (= requests)."""
    res = ms.spec.resources
    requests: dict[str, str] = {}
    limits: dict[str, str] = {}
    if res.cpu is not None:
        requests["cpu"] = str(res.cpu)
    memory = str(res.memory) if res.memory is not None else settings.runtime_memory_limit
    requests["memory"] = limits["memory"] = memory
    if with_gpu and res.gpu.count > 0:
        limits[settings.gpu_resource_name] = str(res.gpu.count)
    out: dict[str, Any] = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


def _http_probe(path: str, period: int, failures: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": "http"},
        "periodSeconds": period,
        "timeoutSeconds": 3,
        "failureThreshold": failures,
    }


def runtime_container(
    ms: ModelService, variant: Variant, settings: OperatorSettings, image: str, mounts: list[dict[str, Any]]
) -> dict[str, Any]:
    startup_seconds = gpufit.startup_seconds(ms, variant, settings.startup_timeout_seconds)
    startup_failures = max(1, startup_seconds // PROBE_PERIOD_SECONDS)
    return {
        "name": RUNTIME_CONTAINER,
        "image": image,
        "command": ["kubemaas-runtime"],
        "args": ["serve", *auth_args(ms.spec.runtime)],
        "env": runtime_env(ms, variant, settings),
        "ports": [{"name": "http", "containerPort": HTTP_PORT, "protocol": "TCP"}],
        "resources": container_resources(ms, settings, with_gpu=True),
        # A slow model load holds off the liveness probe until the model is ready.
        "startupProbe": _http_probe(READY_PATH, PROBE_PERIOD_SECONDS, startup_failures),
        "readinessProbe": _http_probe(READY_PATH, PROBE_PERIOD_SECONDS, 2),
        "livenessProbe": _http_probe(LIVE_PATH, 10, 3),
        "lifecycle": {"preStop": {"sleep": {"seconds": PRE_STOP_SLEEP_SECONDS}}},
        "securityContext": container_security_context(),
        "volumeMounts": [*mounts, {"name": TMP_VOLUME, "mountPath": "/tmp"},
                         *(adapter_mounts() if wants_adapters(ms) else []),
                         *auth_mounts(ms.spec.runtime),
                         *([{"name": SHM_VOLUME, "mountPath": "/dev/shm"}] if shm_size_limit(ms, variant) else [])],
        "terminationMessagePath": "/dev/termination-log",
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }


def scheduling_fields(ms: ModelService, settings: OperatorSettings, variant: Variant | None = None) -> dict[str, Any]:
    """The user's scheduling merged with what GPUs need (product selector, GPU toleration, and
    with the GPU-fit check the variant's memory per GPU as a required node affinity)."""
    spec = ms.spec
    sched = spec.scheduling
    node_selector = dict(sched.node_selector)
    tolerations = [t.to_wire() for t in sched.tolerations]
    if spec.resources.gpu.product:
        node_selector[settings.gpu_product_label] = spec.resources.gpu.product  # the spec's product wins
    if spec.uses_gpu:
        gpu_toleration = {"key": settings.gpu_resource_name, "operator": "Exists", "effect": "NoSchedule"}
        if gpu_toleration not in tolerations:
            tolerations.append(gpu_toleration)
    fields: dict[str, Any] = {}
    if node_selector:
        fields["nodeSelector"] = node_selector
    if tolerations:
        fields["tolerations"] = tolerations
    need = gpufit.estimate(ms, variant) if variant is not None else None
    if need is not None:
        fields["affinity"] = placement.with_memory_requirement(
            sched.affinity, placement.memory_requirement(need, settings.gpu_memory_label))
    elif sched.affinity:
        fields["affinity"] = copy.deepcopy(sched.affinity)
    if sched.priority_class_name:
        fields["priorityClassName"] = sched.priority_class_name
    if sched.runtime_class_name:
        fields["runtimeClassName"] = sched.runtime_class_name
    return fields


def termination_grace_seconds(settings: OperatorSettings) -> int:
    """preStop pause + the runtime's drain of in-flight requests + a margin."""
    return PRE_STOP_SLEEP_SECONDS + settings.drain_seconds + 10


def build_pod_template(
    ms: ModelService, variant: Variant, settings: OperatorSettings, image: str
) -> dict[str, Any]:
    source = model_mount(ms.spec.model, settings.model_volume_size_limit)
    init_containers = []
    if source.fetch:
        resources = container_resources(ms, settings, with_gpu=False)
        init_containers.append(fetch_init_container(ms.spec.model, image, container_security_context(), resources,
                                                    settings))
    if model_cache.uses_node_cache(ms):
        source, init_containers = with_node_cache(ms, source, init_containers)
    if wants_adapters(ms):
        init_containers.append(adapter_fetch_sidecar(ms, image, container_security_context(), settings))
    shm = shm_size_limit(ms, variant)
    pod_spec: dict[str, Any] = {
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": pod_security_context(),
        "terminationGracePeriodSeconds": termination_grace_seconds(settings),
        **({"initContainers": init_containers} if init_containers else {}),
        "containers": [runtime_container(ms, variant, settings, image, source.mounts)],
        "volumes": [*source.volumes, {"name": TMP_VOLUME, "emptyDir": {"sizeLimit": settings.tmp_size_limit}},
                    *auth_volumes(ms.spec.runtime),
                    *(adapter_volumes(ms, settings) if wants_adapters(ms) else []),
                    *([{"name": SHM_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": shm}}] if shm else [])],
        **scheduling_fields(ms, settings, variant),
    }
    labels = variant_labels(ms.name, variant.name)
    if model_cache.uses_node_cache(ms):
        pod_spec["affinity"] = model_cache.with_cache_affinity(pod_spec.get("affinity"), ms)
        # the copy on the node is in its folder already: no ownership walk over it on each start
        pod_spec["securityContext"]["fsGroupChangePolicy"] = "OnRootMismatch"
        labels[model_cache.CACHE_KEY_LABEL] = model_cache.cache_key(ms.spec.model.uri)
    return {
        "metadata": {
            "labels": labels,
            "annotations": {
                "kubectl.kubernetes.io/default-container": "runtime",
                "prometheus.io/scrape": "true",
                "prometheus.io/port": str(HTTP_PORT),
                "prometheus.io/path": "/metrics",
            },
        },
        "spec": pod_spec,
    }
