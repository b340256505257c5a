"""`render`: print every object the operator would create for the ModelServices in some files.

Offline, like `helm template`: no cluster is read. A spec the API server would refuse is
refused here too, with the field named (`spec.variants[1].weight: ...`), and exit status 1.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import yaml
from pydantic import ValidationError

from kubemaas_operator import placement, policy
from kubemaas_operator.api import KIND, ModelService, describe_errors
from kubemaas_operator.builders import VARIANT_LABEL, build_children
from kubemaas_operator.engine import (
    ENGINE_REASON,
    MULTI_NODE_REASON,
    engine_refusal,
    multi_node_refusal,
)
from kubemaas_operator.multinode import is_multi_node
from kubemaas_operator.settings import OperatorSettings

STDIN = "-"


@dataclass
class RenderResult:
    objects: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # (source note, child)
    errors: list[str] = field(default_factory=list)


def yaml_paths(path: str) -> list[str]:
    """A file, `-`, or every *.yaml / *.yml file of a directory (sorted)."""
    if path != STDIN and Path(path).is_dir():
        return sorted(str(p) for p in Path(path).iterdir() if p.suffix in (".yaml", ".yml"))
    return [path]


def read_documents(path: str, stdin: TextIO) -> Iterator[tuple[int, Any]]:
    text = stdin.read() if path == STDIN else Path(path).read_text()
    for index, document in enumerate(yaml.safe_load_all(text), start=1):
        if document is not None:
            yield index, document


def render_document(document: Any, where: str, settings: OperatorSettings, namespace: str,
                    result: RenderResult) -> None:
    if not isinstance(document, dict):
        result.errors.append(f"{where}: not a Kubernetes object (a YAML mapping)")
        return
    if document.get("kind") != KIND:
        return  # other kinds (a Secret, a PVC) are the user's, not the operator's
    name = (document.get("metadata") or {}).get("name", "?")
    try:
        ms = ModelService.from_body(document)
    except ValidationError as exc:
        result.errors.extend(f'{where}: ModelService "{name}": {line}' for line in describe_errors(exc))
        return
    if not ms.metadata.namespace:
        ms = ms.model_copy(update={"metadata": ms.metadata.model_copy(update={"namespace": namespace})})
    note = f"{where}: ModelService {ms.namespace}/{ms.name}"
    refused = policy.policy_problem(ms, settings, None)
    if refused is not None:  # the operator would create nothing for it
        result.errors.append(f'{where}: ModelService "{name}": {refused.reason}: {refused.message}')
        return
    # known offline: the operator would give these variants no pods
    cannot_run = [(MULTI_NODE_REASON, why) for v in ms.spec.variants
                  if (why := multi_node_refusal(ms, v, settings.multi_node))]
    cannot_run += [(ENGINE_REASON, why) for v in ms.spec.variants
                   if not cannot_run and (why := engine_refusal(ms, v))]
    if cannot_run:
        result.errors.extend(f'{where}: ModelService "{name}": {reason}: {why}' for reason, why in cannot_run)
        return
    # The GPU-fit estimate (offline: against no cluster, so nothing is refused here)
    fits = {f.variant: f.estimate for f in placement.fit_variants(ms, None, settings.gpu_memory_label)}
    if is_multi_node(ms, settings):  # groups: the RayClusters the operator would write
        from kubemaas_operator.reconcile import decide

        children: tuple[dict[str, Any], ...] = decide(ms, settings, None).children
    else:
        children = tuple(build_children(ms, settings))
    for child in children:
        variant = child["metadata"]["labels"].get(VARIANT_LABEL)
        fit = (fits.get(variant) if child["kind"] in ("Deployment", "RayCluster") and variant
               else None)
        result.objects.append((f"{note}\n# GPU fit: variant {variant} {fit.describe()}" if fit else note, child))


def render_paths(paths: Iterable[str], settings: OperatorSettings, namespace: str = "default",
                 stdin: TextIO = sys.stdin) -> RenderResult:
    result = RenderResult()
    for given in paths:
        for path in yaml_paths(given):
            try:
                for index, document in read_documents(path, stdin):
                    render_document(document, f"{path} (document {index})", settings, namespace, result)
            except (OSError, yaml.YAMLError) as exc:
                result.errors.append(f"{path}: {exc}")
    return result


class _PlainDumper(yaml.SafeDumper):
    """YAML without &anchors/*aliases, however the dicts are shared."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def format_objects(result: RenderResult) -> str:
    parts = [
        f"# {note}\n" + yaml.dump(child, Dumper=_PlainDumper, sort_keys=False, width=120)
        for note, child in result.objects
    ]
    return "---\n".join(parts)


def run_render(paths: list[str], namespace: str, settings: OperatorSettings,
               out: TextIO = sys.stdout, err: TextIO = sys.stderr, stdin: TextIO = sys.stdin) -> int:
    result = render_paths(paths, settings, namespace, stdin)
    if result.errors:
        for line in result.errors:
            print(f"error: {line}", file=err)
        return 1
    if result.objects:
        out.write("# Rendered offline by `kubemaas-operator render`: ownerReferences carry a placeholder\n"
                  "# uid until the API server assigns the ModelService's.\n")
        out.write(format_objects(result))
    return 0
