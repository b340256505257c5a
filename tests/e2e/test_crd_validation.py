"""The API server agrees with `render`: every example accepted, every invalid fixture refused
with the same field named (`kubectl apply --dry-run=server`), the same defaults applied.

The CRD is installed once for the module (server-side apply, then wait for Established).
Dry runs write nothing, so they use the `default` namespace.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import yaml
from kubemaas_operator.api import ModelService
from kubemaas_operator.render import run_render
from kubemaas_operator.settings import OperatorSettings

from tests.unit.support import EXAMPLES, INVALID_FIXTURES, REPO, fixture_expectations, names_field

pytestmark = pytest.mark.e2e
CRD = "modelservices.kubemaas.io"


@pytest.fixture(scope="module")
def crd(cluster):
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(REPO / "crds"))
    cluster.kubectl("wait", "--for=condition=Established", f"crd/{CRD}", "--timeout=60s")
    # Discovery and the published OpenAPI follow Established by a moment.
    cluster.wait_until(lambda: cluster.kubectl("get", "msvc", "-A", check=False).returncode == 0,
                       timeout=30, what="the msvc resource in discovery")
    return cluster


def dry_run(cluster, path: Path, *extra: str):
    return cluster.kubectl("apply", "--dry-run=server", "-n", "default", "-f", str(path), *extra, check=False)


def render_errors(path: Path) -> str:
    err = io.StringIO()
    code = run_render([str(path)], "default", OperatorSettings(), out=io.StringIO(), err=err)
    assert code == 1
    return err.getvalue()


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_example_is_accepted(crd, example):
    proc = dry_run(crd, example)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("fixture", INVALID_FIXTURES, ids=lambda p: p.name)
def test_invalid_fixture_is_refused_by_the_server_and_by_render(crd, fixture):
    field, message = fixture_expectations(fixture)
    proc = dry_run(crd, fixture)
    assert proc.returncode != 0, f"the API server accepted {fixture.name}"
    assert names_field(proc.stderr, field), proc.stderr
    rendered = render_errors(fixture)
    assert names_field(rendered, field), rendered
    if message:
        assert message in proc.stderr, proc.stderr
        assert message in rendered, rendered


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_server_defaults_equal_the_models_defaults(crd, example):
    proc = dry_run(crd, example, "-o", "json")
    assert proc.returncode == 0, proc.stderr
    stored = json.loads(proc.stdout)
    (document,) = [d for d in yaml.safe_load_all(example.read_text()) if d["kind"] == "ModelService"]
    parsed = ModelService.from_body({**document, "metadata": {"name": document["metadata"]["name"]}})
    assert _without_empty(stored["spec"]) == _without_empty(parsed.to_wire()["spec"])


def _without_empty(value):
    """Empty lists and objects left out: the models list empty containers the server leaves out."""
    if isinstance(value, dict):
        cleaned = {k: _without_empty(v) for k, v in value.items()}
        return {k: v for k, v in cleaned.items() if v not in ({}, [])}
    return value


def test_scale_subresource_and_printer_columns(crd, namespace):
    crd.kubectl("apply", "-n", namespace, "-f", str(REPO / "examples" / "cpu-minimal.yaml"))
    crd.kubectl("scale", "-n", namespace, "msvc/minilm", "--replicas=3")
    assert crd.get_json("-n", namespace, "msvc", "minilm")["spec"]["replicas"] == 3
    header = crd.kubectl("get", "-n", namespace, "msvc").stdout.splitlines()[0].split()
    assert header[:8] == ["NAME", "READY", "REPLICAS", "AVAILABLE", "VARIANTS", "GPUS", "URL", "AGE"]
    assert "minilm" in crd.kubectl("get", "-n", namespace, "kubemaas").stdout  # category


def test_kubectl_explain_describes_the_fields(crd):
    def explained():
        proc = crd.kubectl("explain", "modelservice.spec.variants", check=False)
        text = " ".join(proc.stdout.split())  # kubectl wraps the descriptions
        return proc.returncode == 0 and "weights sum to 100" in text and text
    text = crd.wait_until(explained, timeout=60, what="kubectl explain modelservice.spec.variants")
    assert "quantization" in text
