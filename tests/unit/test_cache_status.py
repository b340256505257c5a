"""Per-node model cache status from the pods' fetch reports: one case per behaviour."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from kubemaas_operator.api import ModelServiceStatus
from kubemaas_operator.builders.model_cache import CACHE_KEY_LABEL, cache_key
from kubemaas_operator.builders.naming import FETCH_CONTAINER
from kubemaas_operator.cache_status import cache_summary, node_cache_statuses, parse_report

KEY = cache_key("hf://org/model@abc123")
OLD_KEY = cache_key("hf://org/model@0ld000")


def _line(cache: str = "hit", key: str = KEY, revision: str = "abc123", size: int = 1000) -> str:
    return "KubemaasCache: " + json.dumps({"bytes": size, "cache": cache, "key": key,
                                           "revision": revision, "uri": "hf://org/model@abc123"})


def _pod(node: str | None = "n1", key: str = KEY, message: str | None = None, exit_code: int = 0,
         finished: str = "2026-01-01T10:00:00Z", running: bool = False) -> dict:
    """A pod as the operator's pod index holds it; ``message`` None: the fetch has not ended."""
    state: dict = {"running": {"startedAt": finished}} if running or message is None else \
        {"terminated": {"exitCode": exit_code, "reason": "Completed" if exit_code == 0 else "Error",
                        "message": message, "finishedAt": finished}}
    return {"metadata": {"labels": {"kubemaas.io/modelservice": "m", CACHE_KEY_LABEL: key}},
            "spec": {"nodeName": node},
            "status": {"initContainerStatuses": [{"name": FETCH_CONTAINER, "state": state}]}}


def _wire(pods: list[dict], key: str = KEY) -> list[dict]:
    return [n.to_wire() for n in node_cache_statuses(pods, key)]


CASES = [
    ("hit", [_pod(message=_line("hit"))],
     [{"node": "n1", "key": KEY, "revision": "abc123", "bytes": 1000, "ready": True, "pods": 1,
       "lastResult": "Hit", "lastResultTime": "2026-01-01T10:00:00Z"}]),
    ("fill", [_pod(message=_line("filled", size=5))],
     [{"node": "n1", "key": KEY, "revision": "abc123", "bytes": 5, "ready": True, "pods": 1,
       "lastResult": "Filled", "lastResultTime": "2026-01-01T10:00:00Z"}]),
    ("fetch still running: the node counts, not ready", [_pod(message=None)],
     [{"node": "n1", "key": KEY, "revision": "", "bytes": 0, "ready": False, "pods": 1}]),
    ("no line (an exit without a report)", [_pod(message="")],
     [{"node": "n1", "key": KEY, "revision": "", "bytes": 0, "ready": False, "pods": 1}]),
    ("malformed JSON", [_pod(message="KubemaasCache: {\"cache\": \"hit\", ")],
     [{"node": "n1", "key": KEY, "revision": "", "bytes": 0, "ready": False, "pods": 1}]),
    ("a report without bytes", [_pod(message="KubemaasCache: " + json.dumps({"cache": "hit", "key": KEY}))],
     [{"node": "n1", "key": KEY, "revision": "", "bytes": 0, "ready": False, "pods": 1}]),
    ("an unknown result", [_pod(message=_line("evicted"))],
     [{"node": "n1", "key": KEY, "revision": "", "bytes": 0, "ready": False, "pods": 1}]),
    ("a failed fetch", [_pod(message="ModelFetchFailed: hub answered 404", exit_code=1)],
     [{"node": "n1", "key": KEY, "revision": "", "bytes": 0, "ready": False, "pods": 1}]),
    ("a report of another key than the pod's", [_pod(message=_line(key=OLD_KEY))],
     [{"node": "n1", "key": KEY, "revision": "", "bytes": 0, "ready": False, "pods": 1}]),
    ("two pods on one node: one entry, the latest report",
     [_pod(message=_line("filled", size=7), finished="2026-01-01T10:00:00Z"),
      _pod(message=_line("hit", size=7), finished="2026-01-01T11:30:00Z")],
     [{"node": "n1", "key": KEY, "revision": "abc123", "bytes": 7, "ready": True, "pods": 2,
       "lastResult": "Hit", "lastResultTime": "2026-01-01T11:30:00Z"}]),
    ("two pods on one node, the second still fetching (waiting on the lock)",
     [_pod(message=None), _pod(message=_line("filled"))],
     [{"node": "n1", "key": KEY, "revision": "abc123", "bytes": 1000, "ready": True, "pods": 2,
       "lastResult": "Filled", "lastResultTime": "2026-01-01T10:00:00Z"}]),
    ("two nodes, sorted by name", [_pod("n2", message=_line("filled")), _pod("n1", message=None)],
     [{"node": "n1", "key": KEY, "revision": "", "bytes": 0, "ready": False, "pods": 1},
      {"node": "n2", "key": KEY, "revision": "abc123", "bytes": 1000, "ready": True, "pods": 1,
       "lastResult": "Filled", "lastResultTime": "2026-01-01T10:00:00Z"}]),
    ("stale pods of an earlier revision say nothing of the current entry",
     [_pod("n1", key=OLD_KEY, message=_line(key=OLD_KEY, revision="0ld000")),
      _pod("n2", message=_line("filled"))],
     [{"node": "n2", "key": KEY, "revision": "abc123", "bytes": 1000, "ready": True, "pods": 1,
       "lastResult": "Filled", "lastResultTime": "2026-01-01T10:00:00Z"}]),
    ("a pod not scheduled yet has no node", [_pod(None, message=None)], []),
    ("no pods", [], []),
]


@pytest.mark.parametrize(("pods", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_node_cache_status(pods: list[dict], expected: list[dict]) -> None:
    assert _wire(pods) == expected


def test_the_other_key_sees_its_own_pods() -> None:
    """The same pods read for the earlier key: the revision is the entry's own."""
    pods = [_pod("n1", key=OLD_KEY, message=_line(key=OLD_KEY, revision="0ld000")), _pod("n2")]
    assert [(n["node"], n["revision"], n["ready"]) for n in _wire(pods, OLD_KEY)] == [("n1", "0ld000", True)]


def test_a_time_that_does_not_parse_still_counts_the_report() -> None:
    [node] = node_cache_statuses([_pod(message=_line("hit"), finished="yesterday")], KEY)
    assert (node.ready, node.last_result, node.last_result_time) == (True, "Hit", None)


def test_parse_report_reads_the_runtimes_line_and_nothing_else() -> None:
    report = parse_report(_line("filled", size=42) + "\n")
    assert report is not None and (report.cache, report.key, report.bytes) == ("filled", KEY, 42)
    assert parse_report("ModelLoadFailed: no config.json") is None
    assert parse_report("KubemaasCache: [1, 2]") is None
    assert parse_report("KubemaasCache: " + json.dumps({"cache": "hit", "key": KEY, "bytes": -1})) is None


@pytest.mark.parametrize(("ready", "total", "text"), [(0, 0, "0/0 nodes"), (1, 2, "1/2 nodes"), (3, 3, "3/3 nodes")])
def test_cache_summary(ready: int, total: int, text: str) -> None:
    pods = [_pod(f"n{i}", message=_line() if i < ready else None) for i in range(total)]
    assert cache_summary(node_cache_statuses(pods, KEY)) == text


def test_status_round_trips_through_its_model() -> None:
    """What the operator writes, read back by the next refresh (model_validate)."""
    nodes = node_cache_statuses([_pod(message=_line("hit"))], KEY)
    wire = ModelServiceStatus(cache=nodes, cache_summary=cache_summary(nodes)).to_wire()
    again = ModelServiceStatus.model_validate(wire)
    assert again.cache == nodes and again.cache_summary == "1/1 nodes"
    assert again.cache[0].last_result_time == datetime(2026, 1, 1, 10, tzinfo=UTC)


@pytest.mark.parametrize("cache", ["hit", "filled"])
def test_the_runtimes_own_report_is_what_the_operator_reads(cache: str) -> None:
    """The contract: the line fetch --cache writes (fetch_cache.CacheEntry) parses here."""
    from kubemaas_runtime.fetch_cache import CacheEntry, uri_revision

    uri = "hf://org/model@abc123"
    line = CacheEntry(cache, KEY, uri, uri_revision(uri), 4096).report()
    report = parse_report(line)
    assert report is not None and (report.cache, report.key, report.revision, report.bytes) == (cache, KEY, "abc123", 4096)
