"""kopf's last-handled configuration, built without copying what it then throws away.

kopf decides create/update/no-op by comparing an object's "essence" (its spec, labels and
annotations) with the copy it stored in an annotation, and it builds that essence on every event
of every kind it watches with handlers, ours included for Deployments, Pods and Nodes that have
no create/update handler at all. Its ``build`` deep-copies the whole body first (status and
managedFields included) and then deletes all but the essence: at 500 ModelServices that copy was
17% of the operator's CPU (docs/operator.md, "What the profile showed").

This storage builds the essence only for the kinds with create/update handlers (ModelService),
from a body without the status and managedFields, so every create/update decision is kopf's
own and the copy is small; for the other kinds it is empty, as kopf never compares or stores it.

It keeps the essence in memory, by uid, not in an annotation: kopf's annotation cost one PATCH
of every ModelService after its first reconcile, a write the floor does not have, and a watch
event back to every watcher (docs/operator.md, "Measured"). The cost is what a restart sees:
no essence, so every ModelService is a create (kopf's resume cause never comes), and the
create handler prunes any ModelService that carries a status, as it would on resume.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any, cast

import kopf

DROPPED = ("status",)
DROPPED_METADATA = ("managedFields",)


class LeanBody(dict):
    """A body as kopf's ``build`` reads it (a mapping with ``.meta``), as a plain dict: a
    ``kopf.Body`` refers to itself through its views, so it would wait for the cyclic garbage
    collector, and keep the event's spec with it, long after the build."""

    @property
    def meta(self) -> dict:
        return self["metadata"]


def lean(body: Any) -> LeanBody:
    """``body`` without the stanzas the essence never holds (kopf deletes them after its copy)."""
    kept = LeanBody((k, v) for k, v in body.items() if k not in DROPPED)
    metadata = body.get("metadata") or {}
    kept["metadata"] = {k: v for k, v in metadata.items() if k not in DROPPED_METADATA}
    return kept


class LeanDiffBaseStorage(kopf.AnnotationsDiffBaseStorage):
    """kopf's annotation storage for its ``build`` only, which leaves its own annotation (``prefix``
    and ``key``: one an earlier operator version wrote) out of the essence; ``fetch`` and ``store``
    keep the essence in memory instead."""

    def __init__(self, *, kinds: Iterable[str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.kinds = frozenset(kinds)  # the kinds with create/update handlers
        self._essences: dict[str, str] = {}  # uid -> the essence last handled, as compact JSON

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        encoded = self._essences.get(body.get("metadata", {}).get("uid", ""))
        return cast(kopf.BodyEssence, json.loads(encoded)) if encoded is not None else None

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence) -> None:
        """Remember ``essence`` for the object; the patch (a write to the object) stays empty."""
        uid = body.get("metadata", {}).get("uid")
        if uid:
            self._essences[uid] = json.dumps(essence, separators=(",", ":"))

    def forget(self, uid: str) -> None:
        """The object is gone: its essence with it."""
        self._essences.pop(uid, None)

    def build(self, *, body: kopf.Body, extra_fields: Iterable[Any] | None = None) -> kopf.BodyEssence:
        if body.get("kind") not in self.kinds:
            return cast(kopf.BodyEssence, {})  # no change handler: kopf never compares it
        if extra_fields:  # a handler that follows a status field: kopf's own path, all of it
            return super().build(body=body, extra_fields=extra_fields)
        return super().build(body=cast(kopf.Body, lean(body)))
