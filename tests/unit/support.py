"""Shared helpers of the operator's unit tests: examples, invalid fixtures, spec factories."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from kubemaas_operator.api import ModelService

REPO = Path(__file__).resolve().parents[2]
# examples/*.yaml apply as they are; examples/addons/ need an add-on's CRD (KEDA, Gateway API);
# examples/refused/ are accepted by the API server and refused by the GPU-fit check on purpose;
# examples/multinode/ need the operator's multiNode switch and KubeRay (gpu.nodes > 1).
EXAMPLES = sorted([*(REPO / "examples").glob("*.yaml"), *(REPO / "examples").glob("addons/*.yaml"),
                   *(REPO / "examples").glob("refused/*.yaml"), *(REPO / "examples").glob("multinode/*.yaml")])
INVALID_FIXTURES = sorted((REPO / "tests" / "fixtures" / "invalid").glob("*.yaml"))


def fixture_expectations(path: Path) -> tuple[str, str | None]:
    """The `# expect: field` and optional `# message: text` header lines of an invalid fixture."""
    field, message = None, None
    for line in path.read_text().splitlines():
        if line.startswith("# expect:"):
            field = line.split(":", 1)[1].strip()
        elif line.startswith("# message:"):
            message = line.split(":", 1)[1].strip()
    assert field, f"{path.name} has no '# expect: <field>' line"
    return field, message


def names_field(output: str, field: str) -> bool:
    """Whether an error output names `field` the way the API server and render do."""
    return f"{field}:" in output or f'"{field}"' in output


def model_services_in(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d and d.get("kind") == "ModelService"]


def make_body(spec: dict[str, Any] | None = None, name: str = "m", namespace: str = "ns",
              uid: str | None = "uid-1") -> dict[str, Any]:
    base_spec: dict[str, Any] = {
        "model": {"uri": "file:///models/m", "format": "transformers", "task": "feature-extraction"}
    }
    base_spec.update(spec or {})
    metadata: dict[str, Any] = {"name": name, "namespace": namespace}
    if uid:
        metadata["uid"] = uid
    return {"apiVersion": "kubemaas.io/v1alpha1", "kind": "ModelService", "metadata": metadata, "spec": base_spec}


def make_ms(spec: dict[str, Any] | None = None, **kwargs: Any) -> ModelService:
    return ModelService.from_body(make_body(spec, **kwargs))


# Models of the engine and compile rule tables (test_engines.py, test_compile.py)
LLM = {"uri": "pvc://llm-weights/llama", "format": "transformers", "task": "text-generation"}
GGUF = {"uri": "pvc://models/smollm2", "format": "gguf"}
ENCODER = {"uri": "file:///models/m", "format": "transformers", "task": "feature-extraction"}


def engine_spec(model: dict[str, Any] = LLM, gpus: int = 0, runtime: dict[str, Any] | None = None,
                variants: list[dict[str, Any]] | None = None, **extra: Any) -> dict[str, Any]:
    """A ModelService spec with `model`, `gpus` GPUs and the given runtime and variants."""
    out: dict[str, Any] = {"model": model, "resources": {"gpu": {"count": gpus}}, **extra}
    if runtime:
        out["runtime"] = runtime
    if variants:
        out["variants"] = variants
    return out
