"""Decide, then apply: one level-based reconcile of a ModelService's children.

``decide`` is pure (spec + settings + what was observed -> what to write and delete);
``Reconciler`` does the I/O through :class:`~kubemaas_operator.kube.KubeClient` and keeps the
little per-ModelService memory the status needs between events (the plan last applied and the
generation it came from). It never writes a ModelService's spec, only its status.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

from kubemaas_operator.api import ModelService
from kubemaas_operator.builders import (
    MODELSERVICE_LABEL,
    build_children,
    replicas_by_variant,
    selector_string,
    service_url,
    variant_child_name,
)
from kubemaas_operator.kube import OWNED_KINDS, KindNotInstalled, KubeClient
from kubemaas_operator.observe import Observation, Problem, VariantPlan, compute_status
from kubemaas_operator.settings import OperatorSettings

log = logging.getLogger(__name__)

# An explicit policy to move a ModelService onto the operator's current default runtime image.
IMAGE_POLICY_ANNOTATION = "kubemaas.io/runtime-image-policy"
FOLLOW_OPERATOR = "FollowOperator"

_NOT_INSTALLED_REASONS = {
    "ScaledObject": ("KedaNotInstalled", "spec.autoscaling.engine is keda but the KEDA CRDs "
                     "(scaledobjects.keda.sh) are not installed: install KEDA or use engine hpa."),
    "HTTPRoute": ("GatewayAPINotInstalled", "spec.gateway is set but the Gateway API CRDs "
                  "(httproutes.gateway.networking.k8s.io) are not installed: install them or "
                  "remove spec.gateway."),
}

Key = tuple[str, str]  # (namespace, name)


def choose_runtime_image(ms: ModelService, pinned: str | None, default: str) -> str:
    """The spec's image when it names one; else the image already pinned in status (so an
    operator upgrade with a new default restarts nothing); else the operator's default.
    The annotation ``kubemaas.io/runtime-image-policy: FollowOperator`` opts into the default."""
    if ms.spec.runtime.image:
        return ms.spec.runtime.image
    policy = (ms.metadata.annotations or {}).get(IMAGE_POLICY_ANNOTATION)
    if pinned and policy != FOLLOW_OPERATOR:
        return pinned
    return default


@dataclass(frozen=True)
class Plan:
    key: Key
    uid: str
    generation: int
    runtime_image: str
    children: tuple[dict, ...]
    variants: tuple[VariantPlan, ...]
    selector: str
    url: str


def decide(ms: ModelService, settings: OperatorSettings, pinned_image: str | None) -> Plan:
    image = choose_runtime_image(ms, pinned_image, settings.runtime_image)
    children = tuple(build_children(ms, settings, runtime_image=image))
    split = replicas_by_variant(ms.spec.replicas, ms.spec.variants)
    variants = tuple(
        VariantPlan(v.name, v.quantization, v.weight, split[v.name], variant_child_name(ms.name, v.name))
        for v in ms.spec.variants
    )
    return Plan(
        key=(ms.namespace, ms.name), uid=ms.metadata.uid or "", generation=ms.metadata.generation or 0,
        runtime_image=image, children=children, variants=variants,
        selector=selector_string(ms.name), url=service_url(ms, settings),
    )


def foreign_owner(existing: dict | None, uid: str) -> str | None:
    """The name of the controller that owns ``existing`` when it is not us, else None."""
    if not existing:
        return None
    for ref in existing["metadata"].get("ownerReferences", []):
        if ref.get("controller") and ref.get("uid") != uid:
            return f"{ref.get('kind')} {ref.get('name')}"
    if existing["metadata"].get("labels", {}).get(MODELSERVICE_LABEL) is None:
        return "an object the operator does not manage"
    return None


def stale_children(desired: tuple[dict, ...], observed: list[dict], uid: str) -> list[dict]:
    """Owned children (by controller reference) that the spec no longer asks for."""
    wanted = {(c["kind"], c["metadata"]["name"]) for c in desired}
    out = []
    for obj in observed:
        owned = any(r.get("uid") == uid and r.get("controller")
                    for r in obj["metadata"].get("ownerReferences", []))
        if owned and (obj["kind"], obj["metadata"]["name"]) not in wanted:
            out.append(obj)
    return out


@dataclass
class Reconciler:
    kube: KubeClient
    settings: OperatorSettings
    plans: dict[Key, Plan] = field(default_factory=dict)
    blocking: dict[Key, Problem | None] = field(default_factory=dict)
    last_status: dict[Key, dict] = field(default_factory=dict)
    applied_generation: dict[tuple[str, str], int] = field(default_factory=dict)
    _locks: dict[Key, threading.Lock] = field(default_factory=dict)
    _locks_guard: threading.Lock = field(default_factory=threading.Lock)

    def lock(self, key: Key) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(key, threading.Lock())

    def forget(self, key: Key) -> None:
        plan = self.plans.pop(key, None)
        for variant in plan.variants if plan else ():
            self.applied_generation.pop((key[0], variant.deployment), None)
        for table in (self.blocking, self.last_status):
            table.pop(key, None)
        with self._locks_guard:
            self._locks.pop(key, None)

    def reconcile(self, ms: ModelService, pinned_image: str | None, prune: bool = True) -> Plan:
        """Apply the desired children; ``prune=False`` (a first create, which cannot have stale
        children of its own uid) skips listing every owned kind."""
        plan = decide(ms, self.settings, pinned_image)
        with self.lock(plan.key):
            self.blocking[plan.key] = self._apply(plan, prune)
            self.plans[plan.key] = plan
        return plan

    def _apply(self, plan: Plan, prune: bool) -> Problem | None:
        ns, _ = plan.key
        for child in plan.children:
            name = child["metadata"]["name"]
            try:
                owner = foreign_owner(self.kube.get(child["kind"], ns, name), plan.uid)
                if owner:
                    return Problem("NameConflict",
                                   f"{child['kind']} {name} already exists and belongs to {owner}; "
                                   "rename this ModelService or its variant.")
                applied = self.kube.apply(child)
            except KindNotInstalled as exc:
                reason, message = _NOT_INSTALLED_REASONS.get(
                    exc.kind.kind, ("KindNotInstalled", str(exc)))
                return Problem(reason, message)
            if child["kind"] == "Deployment":
                self.applied_generation[(ns, name)] = applied["metadata"].get("generation", 0)
        if not prune:
            return None
        observed = [dict(obj, kind=kind) for kind in OWNED_KINDS
                    for obj in self.kube.list(kind, ns, plan.selector)]
        for obj in stale_children(plan.children, observed, plan.uid):
            log.info("deleting %s %s/%s: no longer desired", obj["kind"], ns, obj["metadata"]["name"])
            self.kube.delete(obj["kind"], ns, obj["metadata"]["name"], obj["metadata"].get("uid"))
            self.applied_generation.pop((ns, obj["metadata"]["name"]), None)
        return None

    def drifted(self, namespace: str, deployment: dict) -> bool:
        """A Deployment whose spec changed since our last apply (a hand edit)."""
        key = (namespace, deployment["metadata"]["name"])
        applied = self.applied_generation.get(key)
        return applied is not None and deployment["metadata"].get("generation", 0) > applied

    def status_for(self, key: Key, deployments: list[dict], pods: list[dict],
                   previous_conditions: list[dict] | None) -> dict | None:
        """The status to write, or None when it equals what was written last."""
        plan = self.plans.get(key)
        if plan is None:
            return None
        obs = Observation(
            name=key[1], namespace=key[0], generation=plan.generation, selector=plan.selector,
            url=plan.url, runtime_image=plan.runtime_image, variants=plan.variants,
            deployments={d["metadata"]["name"]: d for d in deployments}, pods=tuple(pods),
            blocking=self.blocking.get(key),
            applied_generations={v.deployment: self.applied_generation.get((key[0], v.deployment), 0)
                                 for v in plan.variants},
        )
        status = compute_status(obs, previous_conditions)
        if _same_status(status, self.last_status.get(key)):
            return None
        return status

    def write_status(self, key: Key, status: dict) -> None:
        self.kube.patch_status(key[0], key[1], status)
        self.last_status[key] = status


def _same_status(a: dict, b: dict | None) -> bool:
    if b is None:
        return False
    strip = lambda s: {**s, "conditions": [{k: v for k, v in c.items() if k != "lastTransitionTime"}
                                           for c in s.get("conditions", [])]}  # noqa: E731
    return strip(a) == strip(b)
