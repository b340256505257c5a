"""LoRA adapters (`spec.adapters`) in the pods, without a restart when the list changes
(docs/api.md "LoRA adapters").

The operator writes the list into the ConfigMap `<name>-adapters` (`adapters.json`: a JSON
list of {name, uri}); every pod mounts that ConfigMap as a directory (never through subPath,
so the kubelet updates the file in running pods). Two containers follow the file:
- the native sidecar `fetch-adapters` (an init container with restartPolicy Always, holding
  the model's secretRef) fetches each s3:// and hf:// adapter into the emptyDir /mnt/adapters;
- the runtime (`--adapters-config`) loads each adapter once its directory is complete and
  unloads the ones the list drops, through the same registry as /v1/load_lora_adapter.

The pod template names the ConfigMap, never its content, so changing the list leaves the
template hash alone. The machinery is in the template exactly when `spec.adapters` is set
(an empty list included): setting the field the first time rolls the pods once.
"""

from __future__ import annotations

import json
from typing import Any

from kubemaas_operator.api import ModelService
from kubemaas_operator.api.constants import MAX_ADAPTERS
from kubemaas_operator.builders.model_source import TMP_VOLUME, quantity_bytes
from kubemaas_operator.builders.naming import child_metadata, common_labels
from kubemaas_operator.runtime_contract import ADAPTER_DIR
from kubemaas_operator.settings import OperatorSettings

ADAPTER_CONFIG_VOLUME = "adapter-config"
ADAPTER_VOLUME = "adapters"
ADAPTER_CONFIG_DIR = "/etc/kubemaas/adapters"
ADAPTER_CONFIG_FILE = "adapters.json"
ADAPTER_FETCH_CONTAINER = "fetch-adapters"


def wants_adapters(ms: ModelService) -> bool:
    return ms.spec.adapters is not None and ms.spec.model.generative


def adapter_config_map_name(ms: ModelService) -> str:
    return f"{ms.name}-adapters"


def adapter_list(ms: ModelService) -> str:
    """The ConfigMap's one file: what the runtime and the sidecar follow."""
    return json.dumps([{"name": a.name, "uri": a.uri} for a in ms.spec.adapters or ()],
                      indent=1, sort_keys=True)


def build_adapter_config_map(ms: ModelService) -> dict[str, Any]:
    meta = child_metadata(ms, adapter_config_map_name(ms), common_labels(ms.name, "adapters"))
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta,
            "data": {ADAPTER_CONFIG_FILE: adapter_list(ms)}}


def adapter_env() -> dict[str, str]:
    return {"KUBEMAAS_MAX_LORAS": str(MAX_ADAPTERS),
            "KUBEMAAS_ADAPTERS_CONFIG": f"{ADAPTER_CONFIG_DIR}/{ADAPTER_CONFIG_FILE}",
            "KUBEMAAS_ADAPTER_DIR": ADAPTER_DIR}


def adapter_volumes(ms: ModelService, settings: OperatorSettings) -> list[dict[str, Any]]:
    return [{"name": ADAPTER_CONFIG_VOLUME, "configMap": {"name": adapter_config_map_name(ms)}},
            {"name": ADAPTER_VOLUME, "emptyDir": {"sizeLimit": settings.model_volume_size_limit}}]


def adapter_mounts() -> list[dict[str, Any]]:
    """The serving container's: both read-only."""
    return [{"name": ADAPTER_CONFIG_VOLUME, "mountPath": ADAPTER_CONFIG_DIR, "readOnly": True},
            {"name": ADAPTER_VOLUME, "mountPath": ADAPTER_DIR, "readOnly": True}]


# The sidecar's own, small and fixed: a native sidecar's requests add to the pod's, so
# spec.resources' would ask the scheduler for the model's CPU and memory twice. It imports no
# torch (37 MiB resident with boto3 and huggingface_hub loaded); the rest is the S3 transfer's
# buffers (8 MiB parts, 10 at a time).
ADAPTER_FETCH_RESOURCES: dict[str, Any] = {"requests": {"cpu": "100m", "memory": "512Mi"},
                                           "limits": {"memory": "512Mi"}}


def adapter_fetch_sidecar(ms: ModelService, image: str, security_context: dict[str, Any],
                          settings: OperatorSettings) -> dict[str, Any]:
    container: dict[str, Any] = {
        "name": ADAPTER_FETCH_CONTAINER,
        "image": image,
        "restartPolicy": "Always",  # a native sidecar: runs beside the server for the pod's life
        "command": ["kubemaas-runtime"],
        "args": ["fetch-adapters", "--config", f"{ADAPTER_CONFIG_DIR}/{ADAPTER_CONFIG_FILE}",
                 "--dest", ADAPTER_DIR,
                 "--max-bytes", str(quantity_bytes(settings.model_volume_size_limit))],
        "env": [{"name": "HOME", "value": "/tmp"}],
        "resources": json.loads(json.dumps(ADAPTER_FETCH_RESOURCES)),  # a copy per pod
        "securityContext": security_context,
        "volumeMounts": [
            {"name": ADAPTER_CONFIG_VOLUME, "mountPath": ADAPTER_CONFIG_DIR, "readOnly": True},
            {"name": ADAPTER_VOLUME, "mountPath": ADAPTER_DIR},
            {"name": TMP_VOLUME, "mountPath": "/tmp"},
        ],
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if ms.spec.model.secret_ref is not None:
        container["envFrom"] = [{"secretRef": {"name": ms.spec.model.secret_ref.name}}]
    return container
