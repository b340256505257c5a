"""Per-node status of the node-local model cache (`spec.model.cache: node`): a pure function.

Each pod's fetch init container (`kubemaas-runtime fetch --cache`) ends with one line in its
termination message, `KubemaasCache: {"cache": "hit"|"filled", "key", "uri", "revision",
"bytes"}` (runtime/kubemaas_runtime/fetch_cache.py); the kubelet copies it into the pod's
status, which the operator already watches. From the pods of one ModelService this builds one
:class:`~kubemaas_operator.api.NodeCacheStatus` per node its pods (of the current cache key)
are on:

- a node is ``ready`` when one of those pods reported the entry (hit or filled); its bytes,
  revision and time are those of the latest report there (by the fetch's ``finishedAt``);
- a pod labelled with another key (an earlier model URI or revision, still rolling out) says
  nothing about the current entry and is left out; so is a report naming another key;
- a pod not yet scheduled has no node; a fetch still running, failed (its ``ModelFetchFailed``
  line is the pod's problem, observe.py), or whose line is absent or malformed, counts the pod
  on its node without making the node ready.

The list holds the nodes where the ModelService's pods are now: a node whose pods are all gone
drops out, although its copy stays on disk until evicted (docs/api.md).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kubemaas_operator.api.status import MAX_CACHE_NODES, NodeCacheStatus
from kubemaas_operator.builders.model_cache import CACHE_KEY_LABEL
from kubemaas_operator.builders.naming import FETCH_CONTAINER

REPORT_PREFIX = "KubemaasCache:"


class FetchCacheReport(BaseModel):
    """The fetch step's `KubemaasCache:` line (the runtime's CacheEntry.report)."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    cache: Literal["hit", "filled"]
    key: str = Field(max_length=63)
    revision: str = Field(default="", max_length=256)
    bytes: int = Field(ge=0)


@dataclass(frozen=True)
class PodCacheReport:
    """What one pod says about the entry on its node."""

    node: str
    report: FetchCacheReport | None  # None: no valid report (running, failed, absent, malformed)
    finished_at: datetime | None = None


def parse_report(message: str) -> FetchCacheReport | None:
    """The report in a termination message, or None when it holds none that parses."""
    line = next((part.strip() for part in message.splitlines() if part.strip()), "")
    if not line.startswith(REPORT_PREFIX):
        return None
    try:
        return FetchCacheReport.model_validate_json(line[len(REPORT_PREFIX):].strip())
    except ValidationError:
        return None


def _fetch_terminated(pod: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The fetch init container's terminated state, when it ended with exit code 0."""
    for container in (pod.get("status") or {}).get("initContainerStatuses") or ():
        if container.get("name") != FETCH_CONTAINER:
            continue
        terminated = (container.get("state") or {}).get("terminated") or {}
        return terminated if terminated and terminated.get("exitCode") == 0 else None
    return None


def _time(value: object) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        return None


def pod_report(pod: Mapping[str, Any], key: str) -> PodCacheReport | None:
    """What ``pod`` says about the entry ``key`` on its node; None for a pod of another key or
    one not on a node yet."""
    labels = (pod.get("metadata") or {}).get("labels") or {}
    node = (pod.get("spec") or {}).get("nodeName")
    if labels.get(CACHE_KEY_LABEL) != key or not node:
        return None
    terminated = _fetch_terminated(pod)
    if terminated is None:
        return PodCacheReport(node, None)
    report = parse_report(str(terminated.get("message") or ""))
    if report is None or report.key != key:
        return PodCacheReport(node, None)
    return PodCacheReport(node, report, _time(terminated.get("finishedAt")))


def _latest(reports: list[PodCacheReport]) -> PodCacheReport | None:
    found = [r for r in reports if r.report is not None]
    if not found:
        return None
    return max(found, key=lambda r: (r.finished_at is not None, r.finished_at or datetime.min))


def node_cache_statuses(pods: Iterable[Mapping[str, Any]], key: str) -> list[NodeCacheStatus]:
    """One entry per node with pods of ``key``, sorted by node name (at most MAX_CACHE_NODES)."""
    by_node: dict[str, list[PodCacheReport]] = {}
    for pod in pods:
        found = pod_report(pod, key)
        if found is not None:
            by_node.setdefault(found.node, []).append(found)
    out = []
    for node in sorted(by_node)[:MAX_CACHE_NODES]:
        latest = _latest(by_node[node])
        report = latest.report if latest is not None else None
        out.append(NodeCacheStatus(
            node=node, key=key, pods=len(by_node[node]), ready=report is not None,
            revision=report.revision if report else "", bytes=report.bytes if report else 0,
            last_result=None if report is None else ("Hit" if report.cache == "hit" else "Filled"),
            last_result_time=latest.finished_at if latest is not None else None))
    return out


def cache_summary(nodes: Iterable[NodeCacheStatus]) -> str:
    """The printer column: nodes with the entry ready / nodes with pods, e.g. `1/2 nodes`."""
    listed = list(nodes)
    return f"{sum(n.ready for n in listed)}/{len(listed)} nodes"
