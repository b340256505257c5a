"""operator/Dockerfile and the chart's container: no container engine runs here, so this reads
the image's ENTRYPOINT, CMD and USER, checks they agree with what the chart runs, and runs that
same command from the repository's virtualenv (the `operator` extra, through `dev`).
tests/e2e/test_helm.py runs the operator itself with the chart's settings and credentials."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import yaml

from tests.unit.chart import CRD_FILE, REPO, one, render

DOCKERFILE = REPO / "operator" / "Dockerfile"
BIN = Path(sys.executable).parent


def final_stage() -> list[str]:
    lines = DOCKERFILE.read_text().splitlines()
    starts = [i for i, line in enumerate(lines) if line.upper().startswith("FROM ")]
    return lines[starts[-1]:]


def exec_form(instruction: str) -> list[str]:
    (line,) = [li for li in final_stage() if li.upper().startswith(instruction + " ")]
    value = json.loads(line[len(instruction) + 1:])
    assert isinstance(value, list), f"{instruction} must use the exec (JSON) form"
    return value


def arg_default(name: str) -> str:
    match = re.search(rf"^ARG {name}=(\S+)$", DOCKERFILE.read_text(), re.MULTILINE)
    assert match, f"ARG {name} has no default"
    return match.group(1)


def image_user() -> str:
    (user,) = [li.split()[1] for li in final_stage() if li.upper().startswith("USER ")]
    return re.sub(r"^\$\{(\w+)\}$", lambda m: arg_default(m.group(1)), user)


def image_command() -> list[str]:
    entrypoint, cmd = exec_form("ENTRYPOINT"), exec_form("CMD")
    executable = BIN / entrypoint[0]
    assert executable.exists(), f"{entrypoint[0]} is not installed in {BIN}"
    return [str(executable), *entrypoint[1:], *cmd]


def test_dockerfile_installs_only_the_operator_and_runs_as_non_root():
    text = DOCKERFILE.read_text()
    installs = [li for li in text.splitlines() if "pip install" in li and not li.startswith("#")]
    assert installs and all('".[operator]"' in li for li in installs), installs
    assert not any("torch" in li or "runtime]" in li for li in installs)
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.\d+-slim", text, re.MULTILINE)
    assert re.search(r"^#\s+PYTHON_IMAGE\s", text, re.MULTILINE) and re.search(r"^#\s+OPERATOR_UID\s", text, re.MULTILINE)
    user = image_user()
    assert user.isdigit() and user != "0", "USER must be numeric (runAsNonRoot checks it) and not root"


def test_chart_runs_the_image_command_as_the_image_user(tmp_path):
    dep = one(render(tmp_path), "Deployment")
    spec = dep["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    assert "command" not in container, "the chart relies on the image's ENTRYPOINT"
    assert container["args"] == exec_form("CMD") == ["run"]
    assert exec_form("ENTRYPOINT") == ["kubemaas-operator"]
    assert str(spec["securityContext"]["runAsUser"]) == image_user()
    exposed = {int(p) for li in final_stage() if li.startswith("EXPOSE ") for p in li.split()[1:]}
    assert {p["containerPort"] for p in container["ports"]} == exposed


def test_entrypoint_exists_and_offers_run():
    result = subprocess.run([image_command()[0], "--help"], check=False, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert "run" in result.stdout and "render" in result.stdout
    result = subprocess.run([*image_command(), "--help"], check=False, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: kubemaas-operator run")


def test_entrypoint_starts_and_prints_the_crd():
    """The installed command imports the operator package and runs (no cluster needed)."""
    result = subprocess.run([image_command()[0], "crd"], check=False, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load(result.stdout) == yaml.safe_load((REPO / "crds" / CRD_FILE).read_text())
