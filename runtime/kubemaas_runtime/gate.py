"""The accuracy gate: a quantized variant is compared with full precision on probe inputs at
start, and refused when it drifts more than `--max-drift`.

Probes come from `kubemaas-probes.json` beside the model (inputs and stored full-precision
outputs, as v2 JSON tensors; see docs/quantization.md) or, without that file, are built from
the model's signature, with reference outputs computed before quantizing.

Drift: for floating outputs 1 - the minimum cosine similarity between a probe's variant and
reference rows; for labels (BYTES or integer outputs, or `"metric": "label-change"`) the
share of probe rows whose label changed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from kubemaas_runtime.errors import ModelLoadFailed, QuantizationDriftExceeded
from kubemaas_runtime.protocol import Tensor, json_tensor_data, parse_infer_request
from kubemaas_runtime.tensors import TORCH_DTYPES

PROBE_FILE = "kubemaas-probes.json"
PROBE_FORMAT = "kubemaas-probes/v1"
METRICS = ("cosine", "label-change")
PROBE_ROWS = 16
# Mixed lengths and topics: short fragments, everyday sentences, long technical ones.
PROBE_TEXTS = [
    "Hi",
    "ok",
    "A cat sits on the mat.",
    "The weather is lovely today.",
    "Where is the nearest train station?",
    "I did not like the film at all, it was far too long.",
    "Quantization trades a little accuracy for a lot of speed.",
    "The quick brown fox jumps over the lazy dog.",
    "Kubernetes schedules pods onto nodes that satisfy their resource requests.",
    "She sold the old piano to a collector from Vienna for a surprising price.",
    "Error 503: the upstream service is temporarily unavailable, retry after one second.",
    "def add(a, b): return a + b",
    ("KubeMaaS serves PyTorch models on Kubernetes, declaratively, with dynamic batching and "
     "quantized variants that split traffic by weight."),
    ("The committee postponed its decision on the new budget until the auditors had reviewed "
     "every line of the spending report from the previous fiscal year."),
    "Les modèles de langue répondent en plusieurs langues.",
    "1 2 3 4 5 6 7 8 9 10",
]


@dataclasses.dataclass
class Probes:
    """Probe inputs (one request's tensors), reference outputs, and how drift is measured."""

    inputs: dict[str, Tensor]
    references: dict[str, Tensor]
    metric: str | None = None  # None: chosen per output datatype
    output: str | None = None  # None: every reference output
    source: str = "built"


def _tensors_json(tensors) -> list[dict[str, Any]]:
    return [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape),
             "data": json_tensor_data(t)} for t in tensors]


def _parse_tensors(raw: Any, where: str) -> dict[str, Tensor]:
    if not isinstance(raw, list) or not raw:
        raise ModelLoadFailed(f"{where} must be a non-empty list of v2 tensors")
    try:
        request = parse_infer_request(orjson.dumps({"inputs": raw}), None)
    except Exception as exc:  # noqa: BLE001 - InvalidInput names the tensor
        raise ModelLoadFailed(f"{where}: {exc}") from None
    return {t.name: t for t in request.inputs}


def write_probe_file(path: Path, probes: Probes) -> Path:
    """Write `probes` as kubemaas-probes.json (into `path` when it is a directory)."""
    if path.is_dir():
        path = path / PROBE_FILE
    doc: dict[str, Any] = {"format": PROBE_FORMAT,
                           "inputs": _tensors_json(probes.inputs.values()),
                           "outputs": _tensors_json(probes.references.values())}
    if probes.metric:
        doc["metric"] = probes.metric
    if probes.output:
        doc["output"] = probes.output
    path.write_bytes(orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_INDENT_2))
    return path


def read_probe_file(path: Path) -> Probes:
    where = f"probe file {path}"
    try:
        doc = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError) as exc:
        raise ModelLoadFailed(f"{where} is unreadable: {exc}") from None
    if not isinstance(doc, dict) or doc.get("format") != PROBE_FORMAT:
        raise ModelLoadFailed(f"{where}: 'format' must be {PROBE_FORMAT!r}")
    metric = doc.get("metric")
    if metric is not None and metric not in METRICS:
        raise ModelLoadFailed(f"{where}: 'metric' must be one of {', '.join(METRICS)}")
    references = _parse_tensors(doc.get("outputs"), f"{where} outputs")
    output = doc.get("output")
    if output is not None and output not in references:
        raise ModelLoadFailed(f"{where}: 'output' {output!r} is not among its outputs")
    return Probes(_parse_tensors(doc.get("inputs"), f"{where} inputs"), references,
                  metric, output, source=str(path))


def find_probe_file(model_path: Path) -> Path | None:
    directory = model_path if model_path.is_dir() else model_path.parent
    candidate = directory / PROBE_FILE
    return candidate if candidate.is_file() else None


def build_probe_inputs(specs, rows: int = PROBE_ROWS, seed: int = 0) -> dict[str, Tensor] | None:
    """Probe inputs from the signature: the built-in sentences for text, seeded random values
    for fully shaped numeric inputs; None when the signature does not say enough."""
    rng = np.random.default_rng(seed)
    inputs = {}
    for spec in specs:
        if spec.datatype == "BYTES" and spec.shape == (-1,):
            data = np.array(PROBE_TEXTS[:rows], dtype=object)
        elif spec.exact and spec.shape is not None and spec.datatype in TORCH_DTYPES:
            dims = [rows if i == 0 and d == -1 else d for i, d in enumerate(spec.shape)]
            if any(d < 0 for d in dims):
                return None
            if spec.datatype in ("FP16", "FP32", "FP64"):
                data = rng.standard_normal(dims).astype(spec.datatype.lower().replace("fp", "float"))
            elif spec.datatype.startswith(("INT", "UINT")):
                data = rng.integers(0, 2, dims).astype(spec.datatype.lower())
            else:
                return None
        else:
            return None
        inputs[spec.name] = Tensor(spec.name, spec.datatype, tuple(data.shape), data)
    return inputs or None


def measure_drift(probes: Probes, outputs: dict[str, Tensor]) -> float:
    """The worst drift over the compared outputs."""
    names = [probes.output] if probes.output else list(probes.references)
    worst = 0.0
    for name in names:
        if name not in outputs:
            raise ModelLoadFailed(f"probe output {name!r} is not an output of the model")
        reference, variant = probes.references[name], outputs[name]
        metric = probes.metric or ("cosine" if reference.datatype.startswith(("FP", "BF"))
                                   else "label-change")
        if metric == "cosine":
            worst = max(worst, 1.0 - min_cosine(_floats(reference), _floats(variant)))
        else:
            worst = max(worst, changed_share(reference, variant))
    return worst


def _floats(tensor: Tensor) -> np.ndarray:
    data = tensor.data
    if tensor.datatype == "BF16":
        data = (data.astype(np.uint32) << 16).view(np.float32)
    data = np.asarray(data, dtype=np.float64)
    return data.reshape(data.shape[0] if data.ndim else 1, -1)


def min_cosine(reference: np.ndarray, variant: np.ndarray) -> float:
    if reference.shape != variant.shape:
        raise ModelLoadFailed(f"probe output shape {list(variant.shape)} differs from the "
                              f"reference {list(reference.shape)}")
    dot = (reference * variant).sum(axis=1)
    norms = np.linalg.norm(reference, axis=1) * np.linalg.norm(variant, axis=1)
    cosine = np.where(norms > 0, dot / np.maximum(norms, 1e-30),
                      np.where(np.linalg.norm(reference - variant, axis=1) == 0, 1.0, 0.0))
    return float(min(cosine.min(), 1.0))


def changed_share(reference: Tensor, variant: Tensor) -> float:
    """Share of rows whose label changed: labels compared directly, scores by argmax."""
    def labels(tensor: Tensor) -> np.ndarray:
        if tensor.datatype.startswith(("FP", "BF")):
            return _floats(tensor).argmax(axis=1)
        data = tensor.data.reshape(tensor.data.shape[0] if tensor.data.ndim else 1, -1)
        return np.array([tuple(x.decode() if isinstance(x, bytes) else x for x in row)
                         for row in data], dtype=object)
    before, after = labels(reference), labels(variant)
    changed = [bool(np.any(a != b)) for a, b in zip(before, after)]
    return float(np.mean(changed)) if changed else 0.0


@dataclasses.dataclass
class AccuracyGate:
    """Holds the probes between load (references, before quantizing) and warm-up (check)."""

    probes: Probes
    max_drift: float | None
    drift: float | None = None

    @classmethod
    def prepare(cls, model_path: Path, input_specs, forward: Callable[[dict[str, Tensor]],
                dict[str, Tensor]], max_drift: float | None) -> AccuracyGate | None:
        """Read the probe file, or build probes and run the full-precision `forward` on them.
        None when there is no file and the signature is too vague to build probes."""
        probe_file = find_probe_file(model_path)
        if probe_file is not None:
            return cls(read_probe_file(probe_file), max_drift)
        inputs = build_probe_inputs(input_specs)
        if inputs is None:
            if max_drift is not None:
                raise ModelLoadFailed(
                    f"--max-drift is set but no probes can be built from the model's signature;"
                    f" put a {PROBE_FILE} beside the model (docs/quantization.md)")
            return None
        return cls(Probes(inputs, forward(inputs)), max_drift)

    def check(self, forward: Callable[[dict[str, Tensor]], dict[str, Tensor]]) -> float:
        """Measure the variant's drift; raise QuantizationDriftExceeded above the bound."""
        self.drift = measure_drift(self.probes, forward(self.probes.inputs))
        if self.max_drift is not None and self.drift > self.max_drift:
            raise QuantizationDriftExceeded(
                f"{self.drift:.6g} > {self.max_drift:g} (drift of the variant from full "
                f"precision on {len(next(iter(self.probes.inputs.values())).data)} probes "
                f"from {self.probes.source})")
        return self.drift
