"""runtime/Dockerfile: no container engine runs here, so this reads the image's ENTRYPOINT
and CMD and runs that same command from a fresh virtualenv holding only the package with its
`runtime` extra (as the image installs it; uv links the wheels from its cache, offline),
configured the way the operator configures a pod: KUBEMAAS_* variables."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.runtime.conftest import PYTHON, REPO, RuntimeServer, runtime_env
from tests.runtime.tiny_models import build_torchscript

DOCKERFILE = REPO / "runtime" / "Dockerfile"


def final_stage() -> list[str]:
    lines = DOCKERFILE.read_text().splitlines()
    starts = [i for i, line in enumerate(lines) if line.upper().startswith("FROM ")]
    return lines[starts[-1]:]


def exec_form(instruction: str) -> list[str]:
    (line,) = [l for l in final_stage() if l.upper().startswith(instruction + " ")]
    value = json.loads(line[len(instruction) + 1:])
    assert isinstance(value, list), f"{instruction} must use the exec (JSON) form"
    return value


@pytest.fixture(scope="module")
def image_venv(tmp_path_factory) -> Path:
    """A new virtualenv holding the package's wheel, built now from this checkout, with its
    `runtime` extra; uv links the dependencies from its cache (no network)."""
    uv = shutil.which("uv", path=str(Path(PYTHON).parent)) or shutil.which("uv")
    assert uv, "uv is needed to build the image's virtualenv (make setup installs it)"
    root = tmp_path_factory.mktemp("image")
    venv = root / "venv"

    def run(*command: str) -> None:
        result = subprocess.run([uv, *command], capture_output=True, text=True, check=False,
                                timeout=600, cwd=REPO)
        assert result.returncode == 0, result.stderr

    run("build", "-q", "--wheel", "--offline", "--out-dir", str(root / "dist"), str(REPO))
    (wheel,) = (root / "dist").glob("kubemaas-*.whl")
    run("venv", "-q", "--python", PYTHON, str(venv))
    run("pip", "install", "-q", "--offline", "--python", str(venv / "bin" / "python"),
        f"{wheel}[runtime]")
    return venv


def image_command(venv: Path) -> list[str]:
    """ENTRYPOINT + CMD, with the entry point resolved in the virtualenv's bin directory."""
    entrypoint, cmd = exec_form("ENTRYPOINT"), exec_form("CMD")
    executable = venv / "bin" / entrypoint[0]
    assert executable.exists(), f"{entrypoint[0]} is not installed in {venv}"
    return [str(executable), *entrypoint[1:], *cmd]


def image_env(**extra: str) -> dict[str, str]:
    """The test environment minus PYTHONPATH: the installed package must stand alone."""
    env = runtime_env(**extra)
    env.pop("PYTHONPATH", None)
    return env


def test_dockerfile_runs_as_non_root_and_documents_build_args():
    users = [l.split()[1] for l in final_stage() if l.upper().startswith("USER ")]
    assert users and all(u not in ("root", "0") for u in users)
    text = DOCKERFILE.read_text()
    for arg in ("TORCH_INDEX_URL", "PYTHON_IMAGE"):
        assert re.search(rf"^ARG {arg}=", text, re.MULTILINE), arg
        assert re.search(rf"^#\s+{arg}\s", text, re.MULTILINE), f"{arg} is not documented"
    assert "whl/cpu" in text and re.search(r"whl/cu\d+", text)
    assert shutil.which("kubemaas-runtime", path=str(Path(PYTHON).parent))


def test_image_command_help(image_venv):
    result = subprocess.run([*image_command(image_venv), "--help"], capture_output=True,
                            text=True, check=False, env=image_env(), timeout=120, cwd="/")
    assert result.returncode == 0, result.stderr
    assert "--max-batch-size" in result.stdout and "KUBEMAAS_MAX_BATCH_SIZE" in result.stdout


def test_image_command_serves_a_model_configured_by_env(image_venv, tmp_path):
    build_torchscript(tmp_path / "model")
    env = image_env(KUBEMAAS_MODEL_URI="pvc://models/tiny", KUBEMAAS_FORMAT="torchscript",
                      KUBEMAAS_MODEL_DIR=str(tmp_path / "model"), KUBEMAAS_VARIANT="canary",
                      KUBEMAAS_MAX_BATCH_SIZE="8")
    server = RuntimeServer([], tmp_path, env=env, command=image_command(image_venv)).start()
    try:
        meta = httpx.get(f"{server.url}/v2/models/tiny").json()
        assert meta["parameters"]["variant"] == "canary"
        assert meta["parameters"]["max_batch_size"] == 8
        response = httpx.post(f"{server.url}/v2/models/tiny/infer", json={"inputs": [
            {"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]})
        assert response.status_code == 200, response.text
    finally:
        assert server.stop() == 0, server.logs()
