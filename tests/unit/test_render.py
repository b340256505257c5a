"""`kubemaas-operator render`: every example renders; every invalid fixture is refused with
its field named (the same field `kubectl apply --dry-run=server` names: tests/e2e)."""

from __future__ import annotations

import io
import re
import subprocess
import sys

import pytest
import yaml
from kubemaas_operator.render import run_render
from kubemaas_operator.settings import OperatorSettings

from tests.unit.support import EXAMPLES, INVALID_FIXTURES, REPO, fixture_expectations, names_field

SETTINGS = OperatorSettings()


def render(*paths: str, namespace: str = "default", stdin: str = "",
           settings: OperatorSettings = SETTINGS) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = run_render(list(paths), namespace, settings, out=out, err=err, stdin=io.StringIO(stdin))
    return code, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_every_example_renders(example):
    multi_node = example.parent.name == "multinode"
    settings = SETTINGS.model_copy(update={"multi_node": True}) if multi_node else SETTINGS
    code, out, err = render(str(example), namespace="demo", settings=settings)
    assert code == 0, err
    objects = list(yaml.safe_load_all(out))
    assert objects and all(o["metadata"]["namespace"] == "demo" for o in objects)
    assert {"RayCluster" if multi_node else "Deployment", "Service"} <= {o["kind"] for o in objects}


def test_the_405b_example_spans_two_nodes_and_fits_each_gpu():
    example = REPO / "examples" / "multinode" / "llama-405b.yaml"
    code, _, err = render(str(example))
    assert code == 1 and "MultiNodeNotSupported" in err  # the switch off: refused, no pod
    code, out, err = render(str(example), settings=SETTINGS.model_copy(update={"multi_node": True}))
    assert code == 0, err
    (cluster,) = [o for o in yaml.safe_load_all(out) if o["kind"] == "RayCluster"]
    assert cluster["spec"]["workerGroupSpecs"][0]["replicas"] == 1  # head + 1 worker: 2 nodes
    needs = re.search(r"needs ~(\d+) GiB per GPU .*over 16 GPUs: 8 on each of 2 nodes", out)
    assert needs and 40 < int(needs.group(1)) < 79, out  # bf16 405B / 16 GPUs + KV, under an H100's 79


def test_examples_cover_the_issue_list():
    names = {p.relative_to(REPO / "examples").as_posix() for p in EXAMPLES}
    assert {"cpu-minimal.yaml", "gpu-h100.yaml", "variants.yaml", "autoscaled.yaml", "s3-fetch.yaml"} <= names
    assert {"canary.yaml", "addons/keda-scale-to-zero.yaml", "addons/gateway-canary.yaml"} <= names
    assert "multinode/llama-405b.yaml" in names
    for path in EXAMPLES:
        for document in yaml.safe_load_all(path.read_text()):
            assert "namespace" not in document["metadata"], f"{path.name}: examples name no namespace"


@pytest.mark.parametrize("fixture", INVALID_FIXTURES, ids=lambda p: p.name)
def test_every_invalid_fixture_is_refused_with_the_field_named(fixture):
    field, message = fixture_expectations(fixture)
    code, out, err = render(str(fixture))
    assert code == 1 and out == ""
    assert names_field(err, field), err
    if message:
        assert message in err, err


def test_a_directory_renders_every_file_and_stdin_works():
    code, out, _ = render(str(REPO / "examples"))
    assert code == 0
    top_level = [p for p in EXAMPLES if p.parent == REPO / "examples"]  # a directory is not recursed into
    assert len([o for o in yaml.safe_load_all(out) if o["kind"] == "Deployment"]) >= len(top_level)
    text = (REPO / "examples" / "cpu-minimal.yaml").read_text()
    code, out_stdin, _ = render("-", stdin=text)
    assert code == 0 and "name: minilm-default" in out_stdin


def test_other_kinds_are_ignored_and_the_document_namespace_wins():
    stdin = yaml.safe_dump_all([
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"}},
        {"apiVersion": "kubemaas.io/v1alpha1", "kind": "ModelService",
         "metadata": {"name": "m", "namespace": "mine"},
         "spec": {"model": {"uri": "file:///m.pt", "format": "torchscript"}}},
    ])
    code, out, _ = render("-", stdin=stdin, namespace="other")
    assert code == 0
    assert {o["metadata"]["namespace"] for o in yaml.safe_load_all(out)} == {"mine"}
    assert "kind: Secret" not in out


def test_errors_from_several_documents_are_all_reported():
    bad = (REPO / "tests/fixtures/invalid/weights-not-100.yaml").read_text()
    worse = (REPO / "tests/fixtures/invalid/min-above-max-replicas.yaml").read_text()
    code, _, err = render("-", stdin=bad + "\n---\n" + worse)
    assert code == 1
    assert "spec.variants:" in err and "spec.autoscaling.minReplicas:" in err


def test_unreadable_input_is_an_error_not_a_crash():
    assert render("/nonexistent.yaml")[0] == 1
    assert render("-", stdin="a: [")[0] == 1
    assert render("-", stdin="- just a list")[0] == 1


def test_command_line_entry_point(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "kubemaas_operator", "render", "-f",
                           str(REPO / "tests/fixtures/invalid/gpu-product-without-count.yaml")],
                          capture_output=True, text=True, cwd=REPO, check=False)
    assert proc.returncode == 1 and "spec.resources.gpu.product:" in proc.stderr
    out = tmp_path / "crd.yaml"
    proc = subprocess.run([sys.executable, "-m", "kubemaas_operator", "crd", "-o", str(out)],
                          capture_output=True, text=True, cwd=REPO, check=False)
    assert proc.returncode == 0 and out.read_text() == (REPO / "crds/modelservices.kubemaas.io.yaml").read_text()
