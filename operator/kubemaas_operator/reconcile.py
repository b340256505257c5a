"""Decide, then apply: one level-based reconcile of a ModelService's children.

``decide`` is pure (spec + settings + what was observed -> what to write and delete);
``Reconciler`` does the I/O through :class:`~kubemaas_operator.kube.KubeClient` and keeps the
little per-ModelService memory the status needs between events (the plan last applied and the
generation it came from). It never writes a ModelService's spec, only its status.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from kubemaas_operator import gpufit
from kubemaas_operator.api import ModelService
from kubemaas_operator.builders import (
    MODELSERVICE_LABEL,
    build_children,
    choose_runtime_image,
    selector_string,
    service_url,
)
from kubemaas_operator.kube import OWNED_KINDS, KindNotInstalled, KubeClient, NamespaceTerminating
from kubemaas_operator.observe import Observation, Problem, VariantPlan, compute_status
from kubemaas_operator.rollout import ObservedDeployment, RolloutPlan, RolloutRecord, plan_rollout
from kubemaas_operator.settings import OperatorSettings

log = logging.getLogger(__name__)

_NOT_INSTALLED_REASONS = {
    "ScaledObject": ("KedaNotInstalled", ("spec.autoscaling.engine is keda but the KEDA CRDs "
                     "(scaledobjects.keda.sh) are not installed: install KEDA or use engine hpa.")),
    "HTTPRoute": ("GatewayAPINotInstalled", ("spec.gateway is set but the Gateway API CRDs "
                  "(httproutes.gateway.networking.k8s.io) are not installed: install them or "
                  "remove spec.gateway.")),
}

Key = tuple[str, str]  # (namespace, name)


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
    rollout: RolloutPlan
    scales: tuple[tuple[str, int], ...] = ()  # Deployments only scaled: (name, replicas)
    keep: frozenset[str] = frozenset()  # Deployments not desired but not to be deleted yet
    gateway: bool = False
    fits: tuple[gpufit.VariantFit, ...] = ()  # the GPU-fit estimate of each variant with one
    fit_problem: Problem | None = None  # GPUMemoryInsufficient: variants that get no pods


def decide(ms: ModelService, settings: OperatorSettings, pinned_image: str | None,
           observed: Sequence[ObservedDeployment] = (), record: RolloutRecord | None = None,
           now: datetime | None = None, gpu_nodes: Sequence[gpufit.GpuNode] | None = None) -> Plan:
    """The children to write for ``ms`` now. ``observed`` (its Deployments as watched) and
    ``record`` (the rollout as status last recorded it) decide a canary's progress;
    ``gpu_nodes`` (the cluster's GPUs; None: unknown) which variants no GPU can hold."""
    image = choose_runtime_image(ms, pinned_image, settings.runtime_image)
    rollout = plan_rollout(ms, image, observed, record, now or datetime.now(UTC))
    quantization = {v.name: v.quantization for v in ms.spec.variants}
    fits = gpufit.plan_fit(ms, gpu_nodes, settings.gpu_memory_label)
    # A variant no GPU holds gets no Deployment written (none created: no Pending pod); one that
    # already runs an earlier revision is left as it is, serving, not pruned.
    withheld = gpufit.withheld_deployments(fits, rollout.variants)
    children = tuple(c for c in build_children(ms, settings, runtime_image=image, layouts=rollout.variants)
                     if not (c["kind"] == "Deployment" and c["metadata"]["name"] in withheld))
    refusals = [f.refusal for f in fits if f.refusal]
    return Plan(
        fits=fits, fit_problem=Problem(gpufit.FIT_REASON, " ".join(refusals)) if refusals else None,
        key=(ms.namespace, ms.name), uid=ms.metadata.uid or "", generation=ms.metadata.generation or 0,
        runtime_image=image, children=children,
        variants=tuple(VariantPlan(quantization[lay.name], lay) for lay in rollout.variants),
        selector=selector_string(ms.name), url=service_url(ms, settings), rollout=rollout,
        scales=tuple((lay.stable.deployment, lay.stable.replicas) for lay in rollout.variants
                     if not lay.stable.apply and lay.stable.deployment not in withheld),
        keep=frozenset(name for lay in rollout.variants for name in lay.keep)
        | {lay.stable.deployment for lay in rollout.variants if not lay.stable.apply} | withheld,
        gateway=ms.spec.gateway is not None,
    )


def rollout_status(plan: Plan) -> dict:
    """``status.rollout`` from the plan (the record a restarted operator resumes from)."""
    r = plan.rollout
    out: dict = {"strategy": r.strategy, "phase": r.phase, "stableRevision": r.stable_revision}
    if r.in_canary:
        out.update(canaryRevision=r.canary_revision, step=r.step, steps=r.steps, canaryWeight=r.canary_weight)
        if r.step_started_at:
            out["stepStartedAt"] = r.step_started_at.strftime("%Y-%m-%dT%H:%M:%SZ")
    if r.message:
        out["message"] = r.message
    return out


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


def stale_children(desired: tuple[dict, ...], observed: list[dict], uid: str,
                   keep: frozenset[str] = frozenset()) -> list[dict]:
    """Owned children (by controller reference) that the spec no longer asks for; Deployments
    named in ``keep`` (a stable one being scaled, earlier revisions still serving) stay."""
    wanted = {(c["kind"], c["metadata"]["name"]) for c in desired}
    wanted |= {("Deployment", name) for name in keep}
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
    gpu_nodes: tuple[gpufit.GpuNode, ...] | None = None  # the GPUs node_changed last saw
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

    def reconcile(self, ms: ModelService, pinned_image: str | None, prune: bool = True,
                  observed: Sequence[ObservedDeployment] = (), status: dict | None = None,
                  only_changes: bool = False,
                  gpu_nodes: Sequence[gpufit.GpuNode] | None = None) -> Plan:
        """Apply the desired children; ``prune=False`` (a first create, which cannot have stale
        children of its own uid) skips listing every owned kind. ``status`` is the status the
        object carries (the rollout record when this operator has written none since it
        started); ``only_changes`` (the canary timer) writes only what differs from the last plan."""
        key = (ms.namespace, ms.name)
        with self.lock(key):
            record = RolloutRecord.from_status(self.last_status.get(key) or status)
            plan = decide(ms, self.settings, pinned_image, observed, record, gpu_nodes=gpu_nodes)
            previous = self.plans.get(key) if only_changes else None
            self.blocking[plan.key] = self._apply(plan, prune, previous) or plan.fit_problem
            self.plans[plan.key] = plan
        return plan

    def _apply(self, plan: Plan, prune: bool, previous: Plan | None = None) -> Problem | None:
        ns, _ = plan.key
        unchanged = {json.dumps(c, sort_keys=True) for c in previous.children} if previous else set()
        for child in plan.children:
            name = child["metadata"]["name"]
            if unchanged and json.dumps(child, sort_keys=True) in unchanged:
                continue
            try:
                owner = foreign_owner(self.kube.get(child["kind"], ns, name), plan.uid)
                if owner:
                    return Problem("NameConflict",
                                   f"{child['kind']} {name} already exists and belongs to {owner}; "
                                   "rename this ModelService or its variant.")
                applied = self.kube.apply(child)
            except NamespaceTerminating:
                log.info("namespace %s is being deleted: not creating %s %s", ns, child["kind"], name)
                return None
            except KindNotInstalled as exc:
                reason, message = _NOT_INSTALLED_REASONS.get(
                    exc.kind.kind, ("KindNotInstalled", str(exc)))
                return Problem(reason, message)
            if child["kind"] == "Deployment":
                self.applied_generation[(ns, name)] = applied["metadata"].get("generation", 0)
        for name, replicas in plan.scales:
            if previous is not None and (name, replicas) in previous.scales:
                continue
            # scaled, not applied: its template is the previous revision's, which the spec no
            # longer describes; a changed generation here is ours, not a hand edit
            self.kube.scale_deployment(ns, name, replicas)
            self.applied_generation.pop((ns, name), None)
        if not prune or (previous is not None and _same_shape(previous, plan)):
            return None
        observed = [dict(obj, kind=kind) for kind in OWNED_KINDS
                    for obj in self.kube.list(kind, ns, plan.selector)]
        for obj in stale_children(plan.children, observed, plan.uid, plan.keep):
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
        names = [n for v in plan.variants for n in (v.deployment, v.canary_deployment) if n]
        obs = Observation(
            name=key[1], namespace=key[0], generation=plan.generation, selector=plan.selector,
            url=plan.url, runtime_image=plan.runtime_image, variants=plan.variants,
            deployments={d["metadata"]["name"]: d for d in deployments}, pods=tuple(pods),
            blocking=self.blocking.get(key),
            applied_generations={n: self.applied_generation.get((key[0], n), 0) for n in names},
            gateway=plan.gateway, rollout=rollout_status(plan),
        )
        status = gpufit.with_fit_status(compute_status(obs, previous_conditions), plan.fits)
        if _same_status(status, self.last_status.get(key)):
            return None
        return status

    def write_status(self, key: Key, status: dict) -> None:
        self.kube.patch_status(key[0], key[1], status)
        self.last_status[key] = status


def _child_names(plan: Plan) -> tuple[set[tuple[str, str]], frozenset[str]]:
    return {(c["kind"], c["metadata"]["name"]) for c in plan.children}, plan.keep


def _same_shape(a: Plan, b: Plan) -> bool:
    """The same children by kind and name, and the same Deployments kept: nothing to prune."""
    return _child_names(a) == _child_names(b)


def _same_status(a: dict, b: dict | None) -> bool:
    if b is None:
        return False
    strip = lambda s: {**s, "conditions": [{k: v for k, v in c.items() if k != "lastTransitionTime"}
                                           for c in s.get("conditions", [])]}
    return strip(a) == strip(b)
