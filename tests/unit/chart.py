"""Rendering charts/kubemaas with the helm binary `hack/cluster build` puts in its bin folder
(or one on PATH). Used by tests/unit/test_chart*.py and tests/e2e/test_helm.py."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "kubemaas"
CRD_FILE = "modelservices.kubemaas.io.yaml"


def helm_binary() -> str:
    """helm from hack/cluster's bin folder, else PATH; a failure under CI=true, else a skip."""
    found = _find_helm()
    if found:
        return found
    message = "helm not found: run `hack/cluster build` (make setup)"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


@functools.cache
def _find_helm() -> str | None:
    try:
        out = subprocess.run([str(REPO / "hack" / "cluster"), "bin"], capture_output=True,
                             text=True, check=True)
        local = Path(out.stdout.strip()) / "helm"
        if local.exists():
            return str(local)
    except (subprocess.CalledProcessError, FileNotFoundError):
        pass
    return shutil.which("helm")


def helm(*args: str, check: bool = True, env: dict[str, str] | None = None,
         timeout: float = 120) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([helm_binary(), *args], check=False, capture_output=True, text=True,
                          timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def values_args(values: dict[str, Any] | None, tmp: Path) -> list[str]:
    if not values:
        return []
    path = tmp / f"values-{abs(hash(repr(values)))}.yaml"
    path.write_text(yaml.safe_dump(values))
    return ["-f", str(path)]


def render(tmp: Path, values: dict[str, Any] | None = None, *, chart: Path = CHART,
           release: str = "kubemaas", namespace: str = "kubemaas-system") -> list[dict[str, Any]]:
    """`helm template` of the chart as parsed objects (empty documents dropped)."""
    out = helm("template", release, str(chart), "--namespace", namespace,
               *values_args(values, tmp)).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (found,) = by_kind(objects, kind)
    return found


def container_env(deployment: dict[str, Any]) -> dict[str, str]:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return {e["name"]: e.get("value", "") for e in container.get("env", [])}


def chart_meta() -> dict[str, Any]:
    return yaml.safe_load((CHART / "Chart.yaml").read_text())
