"""The runtime's bearer token: the Secret key named in spec.runtime.auth, mounted as a file
(never an environment variable, which shows in `kubectl describe` and crash dumps) and passed
as `--auth-token-file`."""

from __future__ import annotations

from typing import Any

from kubemaas_operator.api import RuntimeSpec

AUTH_VOLUME = "auth-token"
AUTH_DIR = "/var/run/kubemaas/auth"
AUTH_TOKEN_FILE = f"{AUTH_DIR}/token"


def auth_args(runtime: RuntimeSpec) -> list[str]:
    return ["--auth-token-file", AUTH_TOKEN_FILE] if runtime.auth is not None else []


def auth_volumes(runtime: RuntimeSpec) -> list[dict[str, Any]]:
    if runtime.auth is None:
        return []
    return [{"name": AUTH_VOLUME, "secret": {
        "secretName": runtime.auth.secret_name,
        "items": [{"key": runtime.auth.key, "path": "token"}],
        "defaultMode": 0o440,
    }}]


def auth_mounts(runtime: RuntimeSpec) -> list[dict[str, Any]]:
    if runtime.auth is None:
        return []
    return [{"name": AUTH_VOLUME, "mountPath": AUTH_DIR, "readOnly": True}]
