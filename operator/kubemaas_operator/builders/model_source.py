"""How the model's files reach `/mnt/models`, by URI scheme.

- `pvc://claim/path`: the claim, read-only, its `path` mounted at /mnt/models (subPath).
- `file:///path`: nothing mounted; the files are in the runtime image.
- `s3://...`, `hf://...`: an emptyDir at /mnt/models, filled before the server starts by the
  init container `kubemaas-runtime fetch --uri ... --dest /mnt/models`; `secretRef` is that
  container's environment (envFrom) and never the serving container's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kubemaas_operator.api import ModelSource
from kubemaas_operator.builders.naming import FETCH_CONTAINER
from kubemaas_operator.runtime_contract import MODEL_DIR
from kubemaas_operator.settings import OperatorSettings

MODEL_VOLUME = "model"
TMP_VOLUME = "tmp"


@dataclass(frozen=True)
class ModelMount:
    """What a pod needs for its model: volumes, the serving container's mounts, init containers."""

    volumes: list[dict[str, Any]] = field(default_factory=list)
    mounts: list[dict[str, Any]] = field(default_factory=list)
    fetch: bool = False


def parse_pvc_uri(uri: str) -> tuple[str, str]:
    """pvc://claim/some/path -> ("claim", "some/path"); the path may be empty."""
    rest = uri.removeprefix("pvc://")
    claim, _, path = rest.partition("/")
    return claim, path.strip("/")


_QUANTITY_UNITS = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
                   "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}


def quantity_bytes(quantity: str) -> int:
    """"50Gi" -> 53687091200 (the suffixes settings accept)."""
    number = quantity.rstrip("kMGTPEi")
    return int(float(number) * _QUANTITY_UNITS[quantity[len(number):]])


def model_mount(model: ModelSource, size_limit: str | None = None) -> ModelMount:
    if model.scheme == "pvc":
        claim, path = parse_pvc_uri(model.uri)
        mount: dict[str, Any] = {"name": MODEL_VOLUME, "mountPath": MODEL_DIR, "readOnly": True}
        if path:
            mount["subPath"] = path
        volume = {"name": MODEL_VOLUME, "persistentVolumeClaim": {"claimName": claim, "readOnly": True}}
        return ModelMount(volumes=[volume], mounts=[mount])
    if model.scheme in ("s3", "hf"):
        return ModelMount(
            volumes=[{"name": MODEL_VOLUME, "emptyDir": {"sizeLimit": size_limit} if size_limit else {}}],
            mounts=[{"name": MODEL_VOLUME, "mountPath": MODEL_DIR, "readOnly": True}],
            fetch=True,
        )
    return ModelMount()  # file://: baked into the image


def fetch_init_container(
    model: ModelSource, image: str, security_context: dict[str, Any], resources: dict[str, Any],
    settings: OperatorSettings,
) -> dict[str, Any]:
    """The init container that downloads s3:// or hf:// into the model volume, within the
    volume's size and the operator's fetch time limit."""
    container: dict[str, Any] = {
        "name": FETCH_CONTAINER,
        "image": image,
        "command": ["kubemaas-runtime"],
        "args": ["fetch", "--uri", model.uri, "--dest", MODEL_DIR,
                 "--max-bytes", str(quantity_bytes(settings.model_volume_size_limit)),
                 "--timeout-seconds", str(settings.fetch_timeout_seconds)],
        "env": [{"name": "HOME", "value": "/tmp"}],
        "resources": resources,
        "securityContext": security_context,
        "volumeMounts": [
            {"name": MODEL_VOLUME, "mountPath": MODEL_DIR},
            {"name": TMP_VOLUME, "mountPath": "/tmp"},
        ],
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if model.secret_ref is not None:
        container["envFrom"] = [{"secretRef": {"name": model.secret_ref.name}}]
    return container
