"""Events about a ModelService, posted by the thread that found them, through our own client.

kopf's poster is one queue for the whole operator that retries each refused Event with the
networking backoffs (about 40 s); one Event into a namespace being deleted then delays every
Event after it, for every ModelService. Posting here instead costs the caller one request, and
an Event the API server refuses is logged and dropped: it never holds up anyone else's.
"""

from __future__ import annotations

import logging
import os
from datetime import UTC, datetime
from typing import Any

from kubemaas_operator.kube import ApiError, KubeClient

log = logging.getLogger(__name__)
COMPONENT = "kubemaas-operator"
MAX_MESSAGE = 1024  # the API server refuses longer Event messages


def build_event(parent: Any, type_: str, reason: str, message: str) -> dict:
    """A core/v1 Event about ``parent`` (a ModelService body)."""
    meta = parent["metadata"]
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {
        "apiVersion": "v1", "kind": "Event",
        "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
        "involvedObject": {"apiVersion": parent.get("apiVersion", ""), "kind": parent.get("kind", ""),
                           "name": meta["name"], "namespace": meta["namespace"],
                           "uid": meta.get("uid", "")},
        "type": type_, "reason": reason, "message": message[:MAX_MESSAGE],
        "source": {"component": COMPONENT},
        "reportingComponent": COMPONENT, "reportingInstance": os.environ.get("HOSTNAME", COMPONENT),
        "firstTimestamp": now, "lastTimestamp": now, "count": 1,
    }


def post_event(kube: KubeClient, parent: Any, type_: str, reason: str, message: str) -> None:
    """Post one Event; a refusal (the namespace is going away, an outage) is logged, not raised."""
    try:
        kube.create_event(build_event(parent, type_, reason, message))
    except ApiError as exc:
        log.info("event %s for %s/%s not posted: %s", reason, parent["metadata"].get("namespace"),
                 parent["metadata"].get("name"), exc)
