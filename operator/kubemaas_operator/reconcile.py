"""Decide, then apply: one level-based reconcile of a ModelService's children.

``decide`` is pure (spec + settings + what was observed -> the plan: what to write and
delete); ``Reconciler.reconcile`` applies a plan through :class:`~kubemaas_operator.kube.KubeClient`
and returns it with the problem that blocks it, if any. Per ModelService it keeps what status is
computed from between events (:class:`Applied`) and the status it wrote last. It never writes a
ModelService's spec, only its status.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

from pydantic import ValidationError

from kubemaas_operator import placement
from kubemaas_operator.api import ModelService, ModelServiceStatus
from kubemaas_operator.api.status import RolloutStatus
from kubemaas_operator.builders import (
    MODELSERVICE_LABEL,
    PinnedImages,
    RuntimeImages,
    build_children,
    choose_runtime_images,
    operator_images,
    selector_string,
    service_url,
)
from kubemaas_operator.builders.inference_pool import PICKER_LABEL
from kubemaas_operator.builders.layout import VariantLayout
from kubemaas_operator.builders.model_cache import (
    cache_key,
    reopen_released_volume,
    uses_node_cache,
)
from kubemaas_operator.builders.raycluster import GROUP_LABEL
from kubemaas_operator.engine import (
    ENGINE_REASON,
    MULTI_NODE_REASON,
    engine_refusal,
    multi_node_refusal,
)
from kubemaas_operator.kube import (
    OWNED_KINDS,
    ROUTING_KINDS,
    Conflict,
    KindNotInstalled,
    KubeClient,
    NamespaceTerminating,
)
from kubemaas_operator.multinode import (
    CONTROLLER_MISSING_MESSAGE,
    CONTROLLER_MISSING_REASON,
    is_multi_node,
    plan_groups,
)
from kubemaas_operator.observe import Observation, compute_status
from kubemaas_operator.observed import ObservedDeployment, ObservedGroup, observed_groups
from kubemaas_operator.problem import Problem
from kubemaas_operator.rollout import RolloutPlan, plan_rollout
from kubemaas_operator.settings import OperatorSettings
from kubemaas_operator.store import Key, Store

log = logging.getLogger(__name__)

_NOT_INSTALLED_REASONS = {
    "ScaledObject": ("KedaNotInstalled", ("spec.autoscaling.engine is keda but the KEDA CRDs "
                     "(scaledobjects.keda.sh) are not installed: install KEDA or use engine hpa.")),
    "HTTPRoute": ("GatewayAPINotInstalled", ("spec.gateway is set but the Gateway API CRDs "
                  "(httproutes.gateway.networking.k8s.io) are not installed: install them or "
                  "remove spec.gateway.")),
    "RayCluster": (CONTROLLER_MISSING_REASON, CONTROLLER_MISSING_MESSAGE),
    "InferencePool": ("InferencePoolNotInstalled", ("spec.routing is inferencePool but the Gateway API "
                      "Inference Extension CRDs (inferencepools.inference.networking.k8s.io) are not "
                      "installed: install them (hack/inference-extension crds) or remove spec.routing.")),
}
OBJECTIVE_NOT_INSTALLED = Problem("InferenceObjectiveNotInstalled", (
    "spec.routing is inferencePool but the endpoint picker's InferenceObjective CRD "
    "(inferenceobjectives.inference.networking.x-k8s.io) is not installed, and the picker does "
    "not start without it: install it (hack/inference-extension crds) or remove spec.routing."))
ROUTING_DISABLED = Problem("InferenceRoutingDisabled", (
    "spec.routing is inferencePool but this operator runs no endpoint picker (its "
    "endpoint_picker_image is unset): enable inferenceRouting in the chart or remove spec.routing."))

# Who else holds a child's name, from the watches: (kind, name) -> a description, or None.
Owners = Callable[[str, str], "str | None"]


def no_owners(kind: str, name: str) -> str | None:
    return None


@dataclass(frozen=True)
class Plan:
    key: Key
    uid: str
    generation: int
    runtime_image: RuntimeImages
    children: tuple[dict, ...]
    variants: tuple[VariantLayout, ...]
    selector: str
    url: str
    rollout: RolloutPlan
    scales: tuple[tuple[str, int], ...] = ()  # Deployments only scaled: (name, replicas)
    keep: frozenset[str] = frozenset()  # Deployments not desired but not to be deleted yet
    gateway: bool = False
    fits: tuple[placement.VariantFit, ...] = ()  # the GPU-fit estimate of each variant with one
    refused: Problem | None = None  # EngineCannotShard, GPUMemoryInsufficient: variants that get no pods
    blocked: Problem | None = None  # nothing is written: InferenceRoutingDisabled
    adapters: tuple[str, ...] | None = None  # spec.adapters' names, as the ConfigMap tells the pods
    cache_key: str | None = None  # model.cache node: the node-cache entry its pods use


# Why a variant gets no pods: reasons of the spec against the runtime or the cluster, which a
# spec change or a node change re-plans (no retry).
VARIANT_REFUSAL_REASONS = frozenset({MULTI_NODE_REASON, ENGINE_REASON, placement.FIT_REASON})


def refused_variants(ms: ModelService, fits: Sequence[placement.VariantFit],
                     multi_node: bool = False) -> dict[str, Problem]:
    """The variants that get no pods, each with why: a replica over several nodes first, then an
    engine that cannot use the pod's GPUs, then a memory estimate no GPU holds."""
    out: dict[str, Problem] = {}
    for variant in ms.spec.variants:
        if why := multi_node_refusal(ms, variant, multi_node):
            out[variant.name] = Problem(MULTI_NODE_REASON, why)
        elif why := engine_refusal(ms, variant):
            out[variant.name] = Problem(ENGINE_REASON, why)
    for fit in fits:
        if fit.problem and fit.variant not in out:
            out[fit.variant] = fit.problem
    return out


def _one_problem(refused: dict[str, Problem]) -> Problem | None:
    """One Problem for every refused variant: the first one's reason, every message."""
    if not refused:
        return None
    first = next(iter(refused.values()))
    return Problem(first.reason, " ".join(p.message for p in refused.values()))


def decide(ms: ModelService, settings: OperatorSettings, pinned_image: PinnedImages | None,
           observed: Sequence[ObservedDeployment] = (), record: ModelServiceStatus | None = None,
           now: datetime | None = None, gpu_nodes: Sequence[placement.GpuNode] | None = None,
           groups: Sequence[ObservedGroup] = ()) -> Plan:
    """The children to write for ``ms`` now. ``observed`` (its Deployments as watched) and
    ``record`` (the rollout as status last recorded it) decide a canary's progress;
    ``gpu_nodes`` (the cluster's GPUs; None: unknown) which variants no GPU can hold;
    ``groups`` (the RayClusters of a variant over several nodes, with their pods) how far its
    groups have rolled (multinode.py); on one node, those left from when it ran over several,
    kept until its Deployment is ready."""
    image = choose_runtime_images(ms, pinned_image or PinnedImages(), operator_images(settings))
    rollout = plan_rollout(ms, image, observed, record, now or datetime.now(UTC))
    fits = placement.fit_variants(ms, gpu_nodes, settings.gpu_memory_label)
    # A refused variant gets no Deployment written (none created: no Pending pod, no pod that
    # fails at start); one that already runs an earlier revision is left as it is, serving.
    refused = refused_variants(ms, fits, settings.multi_node)
    if is_multi_node(ms, settings):
        layouts, waiting = _group_layouts(ms, rollout.variants, refused, groups, observed)
    else:
        layouts, waiting = _retiring_groups(rollout.variants, refused, groups, observed)
    rollout = replace(rollout, variants=layouts)
    if waiting and not rollout.in_canary:
        rollout = replace(rollout, phase="Progressing", message=" ".join(waiting)[:4096])
    withheld = placement.withheld_deployments(refused, rollout.variants)
    children = tuple(c for c in build_children(ms, settings, runtime_image=image, layouts=rollout.variants)
                     if not (c["kind"] == "Deployment" and c["metadata"]["name"] in withheld))
    return Plan(
        fits=fits, refused=_one_problem(refused),
        key=(ms.namespace, ms.name), uid=ms.metadata.uid or "", generation=ms.metadata.generation or 0,
        runtime_image=image, children=children,
        variants=rollout.variants,
        selector=selector_string(ms.name), url=service_url(ms, settings), rollout=rollout,
        adapters=None if ms.spec.adapters is None else tuple(a.name for a in ms.spec.adapters),
        cache_key=cache_key(ms.spec.model.uri) if uses_node_cache(ms) else None,
        scales=tuple((lay.stable.deployment, lay.stable.replicas) for lay in rollout.variants
                     if not lay.stable.apply and lay.stable.deployment not in withheld),
        keep=frozenset(name for lay in rollout.variants for name in lay.keep)
        | {lay.stable.deployment for lay in rollout.variants if not lay.stable.apply} | withheld,
        gateway=ms.spec.gateway is not None,
        blocked=ROUTING_DISABLED if ms.spec.routing and not settings.endpoint_picker_image else None,
    )


def _group_layouts(ms: ModelService, layouts: Sequence[VariantLayout], refused: dict[str, Problem],
                   groups: Sequence[ObservedGroup], deployments: Sequence[ObservedDeployment] = (),
                   ) -> tuple[tuple[VariantLayout, ...], list[str]]:
    """Each variant as groups (RayClusters) instead of Deployments; a refused variant writes
    none and keeps the groups it has, serving. A variant that ran on one node (resources.gpu.nodes
    raised from 1) keeps its Deployments, serving, until as many of its groups are ready as it
    has replicas: surge-first, as a new revision rolls. Also returns, per variant kept waiting
    so, what it waits for (the rollout's message)."""
    variants = {v.name: v for v in ms.spec.variants}
    nodes = ms.spec.resources.gpu.nodes
    out = []
    waiting = []
    for lay in layouts:
        stable = replace(lay.stable, replicas=lay.replicas, apply=True)
        if lay.name in refused:
            kept = tuple(g.name for g in groups if g.variant == lay.name)
            out.append(replace(lay, stable=stable, canary=None, canary_weight=0, groups=(), keep=kept,
                           nodes=ms.spec.resources.gpu.nodes))
            continue
        # the revision the spec asks for now: a canary's, else the stable one
        revision = lay.canary.revision if lay.canary else lay.stable.revision
        stable = replace(stable, revision=revision)
        plan = plan_groups(ms, variants[lay.name], lay.replicas, revision, groups)
        keep = plan.keep
        ready = sum(1 for g in groups if g.name in plan.apply and g.ready(nodes))
        one_node = tuple(d.name for d in deployments if d.variant == lay.name)
        if one_node and ready < lay.replicas:
            keep += one_node
            waiting.append(f"Variant {lay.name} now spans {nodes} nodes: its Deployment "
                           f"{', '.join(one_node)} keeps serving until {lay.replicas} of its groups "
                           f"(RayClusters) are ready ({ready} now).")
        out.append(replace(lay, stable=stable, canary=None, canary_weight=0, groups=plan.apply, keep=keep,
                           nodes=nodes))
    return tuple(out), waiting


def _retiring_groups(layouts: Sequence[VariantLayout], refused: dict[str, Problem],
                     groups: Sequence[ObservedGroup], deployments: Sequence[ObservedDeployment],
                     ) -> tuple[tuple[VariantLayout, ...], list[str]]:
    """A variant on one node that ran over several (resources.gpu.nodes lowered to 1) keeps its
    groups, serving, until its Deployment runs the spec rolled out with the variant's replicas
    available: surge-first, the reverse of raising nodes. A refused variant, which gets no
    Deployment, keeps them as it keeps an earlier Deployment: serving, until the spec changes."""
    out = []
    waiting = []
    for lay in layouts:
        kept = tuple(g.name for g in groups if g.variant == lay.name)
        if not kept:
            out.append(lay)
            continue
        deployment = next((d for d in deployments if d.name == lay.deployment), None)
        if lay.name not in refused and _rolled_out(deployment, lay):
            out.append(lay)  # not kept: the apply's prune deletes the groups
            continue
        out.append(replace(lay, keep=lay.keep + kept))
        if lay.name not in refused:
            available = deployment.available if deployment and deployment.revision == lay.revision else 0
            waiting.append(f"Variant {lay.name} now runs on one node: its {len(kept)} group(s) "
                           f"(RayClusters) keep serving until Deployment {lay.deployment} has rolled "
                           f"out with {lay.replicas} ready replicas ({available} now).")
    return tuple(out), waiting


def _rolled_out(deployment: ObservedDeployment | None, lay: VariantLayout) -> bool:
    """The variant's Deployment runs its revision, rolled out (observed.py: every pod updated and
    available) at the variant's replicas; a watched copy of an earlier template does not count."""
    if lay.replicas == 0:
        return True
    return (deployment is not None and deployment.revision == lay.revision and deployment.rolled_out
            and deployment.replicas >= lay.replicas)


def rollout_status(plan: Plan) -> RolloutStatus:
    """``status.rollout`` from the plan (the record a restarted operator resumes from)."""
    r = plan.rollout
    canary = r.in_canary
    started = r.step_started_at.replace(microsecond=0) if canary and r.step_started_at else None
    return RolloutStatus(
        strategy=r.strategy, phase=r.phase, stable_revision=r.stable_revision,  # type: ignore[arg-type]
        canary_revision=r.canary_revision if canary else None, step=r.step if canary else None,
        steps=r.steps if canary else None, canary_weight=r.canary_weight if canary else None,
        step_started_at=started, message=r.message,
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


def stale_children(desired: tuple[dict, ...], observed: list[dict], uid: str,
                   keep: frozenset[str] = frozenset()) -> list[dict]:
    """Owned children (by controller reference) that the spec no longer asks for; Deployments
    named in ``keep`` (a stable one being scaled, earlier revisions still serving) stay."""
    wanted = {(c["kind"], c["metadata"]["name"]) for c in desired}
    wanted |= {(kind, name) for name in keep for kind in ("Deployment", "RayCluster")}
    out = []
    for obj in observed:
        owned = any(r.get("uid") == uid and r.get("controller")
                    for r in obj["metadata"].get("ownerReferences", []))
        if owned and (obj["kind"], obj["metadata"]["name"]) not in wanted:
            out.append(obj)
    return out


@dataclass(frozen=True)
class Applied:
    """What the last reconcile of one ModelService did: what its status is computed from."""

    plan: Plan  # without its children: ``digests`` stand for them
    digests: dict[tuple[str, str], str]  # (kind, name) -> a hash of the body applied
    problem: Problem | None = None  # NameConflict, KedaNotInstalled, ...
    # Deployment -> the metadata.generation our apply got: a higher one is a hand edit, and an
    # observed copy older than it (a watch event in flight) does not count as rolled out
    generations: dict[str, int] = field(default_factory=dict)


class Blocked(Exception):
    def __init__(self, problem: Problem) -> None:
        super().__init__(f"{problem.reason}: {problem.message}")
        self.problem = problem


def _digest(child: dict) -> str:
    return hashlib.blake2b(json.dumps(child, sort_keys=True).encode(), digest_size=16).hexdigest()


@dataclass(frozen=True)
class Reconciler:
    """The applier: writes a plan's children and keeps nothing itself. What it did goes into
    the ModelService's entry of the store it is handed (store.py, owned by the refresher)."""

    kube: KubeClient
    settings: OperatorSettings

    def reconcile(self, store: Store, ms: ModelService, pinned_image: PinnedImages | None, prune: bool = True,
                  observed: Sequence[ObservedDeployment] = (), status: dict | None = None,
                  only_changes: bool = False, owners: Owners = no_owners,
                  gpu_nodes: Sequence[placement.GpuNode] | None = None,
                  then: Callable[[dict[str, dict]], None] | None = None) -> tuple[Plan, Problem | None]:
        """Apply the desired children; ``prune=False`` (a first create, which cannot have stale
        children of its own uid) skips listing every owned kind. ``status`` is the status the
        object carries (the rollout record when this operator has written none since it
        started); ``only_changes`` (the canary timer) writes only what differs from the last
        plan. ``owners`` says who else holds a name, from the watches; ``gpu_nodes`` the GPUs.
        ``then`` runs under the same lock once the children are written, with the Deployments
        whose generation this apply moved (name -> the API server's answer): the spec change's
        own status write (refresh.py), before any refresh can write one from the watches."""
        key = (ms.namespace, ms.name)
        entry = store.entry(key)
        with entry.lock:
            record = _parsed(store.last_status(key, status))
            plan = decide(ms, self.settings, pinned_image, observed, record, gpu_nodes=gpu_nodes,
                          groups=self._groups(ms))
            last = entry.applied
            previous = last if only_changes else None
            generations = dict(last.generations) if last else {}
            digests = {(c["kind"], c["metadata"]["name"]): _digest(c) for c in plan.children}
            problem = None
            moved: dict[str, dict] = {}
            try:
                self._apply(plan, digests, generations, prune, previous, owners, moved)
            except Blocked as exc:
                problem = exc.problem
            except NamespaceTerminating:
                log.info("namespace %s is being deleted: not creating the children of %s", key[0], key[1])
            # a blocked apply wrote only some children: the next one compares against none
            entry.applied = Applied(replace(plan, children=()), {} if problem else digests,
                                    problem or plan.refused, generations)
            if then is not None:
                then(moved)
        return plan, problem or plan.refused

    def _groups(self, ms: ModelService) -> tuple[ObservedGroup, ...]:
        """The RayClusters of a ModelService, with the multiNode switch on (none where KubeRay
        is not installed): over several nodes with their pods (two labelled LISTs); on one node
        without them (one: the groups left from when it ran over several, kept until its
        Deployment is ready, need no readiness)."""
        if not self.settings.multi_node:
            return ()
        clusters = self.kube.list("RayCluster", ms.namespace, selector_string(ms.name))
        if not is_multi_node(ms, self.settings):
            return observed_groups(clusters, ())
        pods = self.kube.list("Pod", ms.namespace, f"{GROUP_LABEL}={ms.name}")
        return observed_groups(clusters, pods)

    def _apply(self, plan: Plan, digests: dict[tuple[str, str], str], generations: dict[str, int],
               prune: bool, previous: Applied | None, owners: Owners, moved: dict[str, dict]) -> None:
        """Write the plan; ``moved`` gets the Deployments whose generation the apply moved."""
        ns, _ = plan.key
        if plan.blocked is not None:
            raise Blocked(plan.blocked)
        checked = False  # whether the picker's InferenceObjective CRD was found served
        for child in plan.children:
            kind, name = child["kind"], child["metadata"]["name"]
            if previous is not None and previous.digests.get((kind, name)) == digests[(kind, name)]:
                continue
            if not checked and _routing_child(child):  # the pod-facing children are written
                if not self.kube.served("InferenceObjective", ns):
                    raise Blocked(OBJECTIVE_NOT_INSTALLED)  # its picker would crash-loop
                checked = True
            applied = self._write_child(child, plan.uid, owners)
            if kind == "PersistentVolume" and (reopen := reopen_released_volume(applied)):
                # a deleted ModelService's of the same name, kept until its eviction ended
                log.info("reopening the Released PV %s for %s/%s", name, ns, plan.key[1])
                self.kube.json_patch(kind, "", name, reopen)
            if kind == "Deployment":
                generation = applied["metadata"].get("generation", 0)
                if generation != generations.get(name):
                    moved[name] = applied
                generations[name] = generation
        for name, replicas in plan.scales:
            if previous is not None and (name, replicas) in previous.plan.scales:
                continue
            # scaled, not applied: its template is the previous revision's, which the spec no
            # longer describes; a changed generation here is ours, not a hand edit
            self.kube.scale_deployment(ns, name, replicas)
            generations.pop(name, None)
        if not prune or (previous is not None and _same_shape(previous, plan, digests)):
            return
        kinds = OWNED_KINDS + (ROUTING_KINDS if self.settings.endpoint_picker_image else ()) \
            + (("RayCluster",) if self.settings.multi_node else ())
        observed = [dict(obj, kind=kind) for kind in kinds
                    for obj in self.kube.list(kind, ns, plan.selector)]
        for obj in stale_children(plan.children, observed, plan.uid, plan.keep):
            log.info("deleting %s %s/%s: no longer desired", obj["kind"], ns, obj["metadata"]["name"])
            self.kube.delete(obj["kind"], ns, obj["metadata"]["name"], obj["metadata"].get("uid"))
            generations.pop(obj["metadata"]["name"], None)

    def _write_child(self, child: dict, uid: str, owners: Owners) -> dict:
        """Server-side apply one child, never over another owner's object: a name the watches
        show held by another ModelService is a conflict at once (all ModelServices share one
        field manager); an object of another manager conflicts on the apply itself, and only
        then is it read, to tell a hand edit of ours (applied again, with force) from an object
        that is not ours."""
        kind, name = child["kind"], child["metadata"]["name"]
        try:
            holder = owners(kind, name)
            if holder is None:
                try:
                    return self.kube.apply(child)
                except Conflict:
                    holder = foreign_owner(self.kube.get(kind, child["metadata"].get("namespace", ""), name), uid)
                    if holder is None:
                        return self.kube.apply(child, force=True)
        except KindNotInstalled as exc:
            reason, message = _NOT_INSTALLED_REASONS.get(exc.kind.kind, ("KindNotInstalled", str(exc)))
            raise Blocked(Problem(reason, message)) from exc
        raise Blocked(Problem("NameConflict", f"{kind} {name} already exists and belongs to {holder}; "
                                              "rename this ModelService or its variant."))


def _routing_child(child: dict) -> bool:
    """The InferencePool or one of its endpoint picker's children."""
    return child["kind"] == "InferencePool" or PICKER_LABEL in child["metadata"].get("labels", {})


def drifted(applied: Applied | None, deployments: Sequence[dict]) -> list[tuple[str, int]]:
    """Those of ``deployments`` (as indexed) whose spec changed since the last apply
    (``applied``), as (name, generation): a generation above the one our apply got is a hand
    edit."""
    if applied is None:
        return []
    found = ((d["metadata"]["name"], d["metadata"].get("generation", 0)) for d in deployments)
    return [(name, gen) for name, gen in found
            if (ours := applied.generations.get(name)) is not None and gen > ours]


def status_for(applied: Applied | None, key: Key, deployments: list[dict], pods: list[dict],
               previous: dict | None) -> dict | None:
    """The status to write after the apply ``applied``, or None when it equals ``previous``
    (the status last written, else the object's) or nothing was applied yet."""
    if applied is None:
        return None
    plan = applied.plan
    names = [n for v in plan.variants for n in (v.deployment, v.canary_deployment) if n]
    obs = Observation(
        name=key[1], namespace=key[0], generation=plan.generation, selector=plan.selector,
        url=plan.url, runtime_image=plan.runtime_image, variants=plan.variants,
        deployments={d["metadata"]["name"]: d for d in deployments}, pods=tuple(pods),
        blocking=applied.problem,
        applied_generations={n: applied.generations.get(n, 0) for n in names},
        gateway=plan.gateway, rollout=rollout_status(plan), adapters=plan.adapters, cache_key=plan.cache_key,
        refused=applied.problem is not None and applied.problem == plan.refused,
    )
    status = placement.with_fit_status(compute_status(obs, _parsed(previous)), plan.fits).to_wire()
    if previous is not None and _same_status(status, previous):
        return None
    return status


def _parsed(status: dict | None) -> ModelServiceStatus | None:
    """The status an object carries, through its model (None when it has none we can read:
    its conditions then start anew)."""
    if not status:
        return None
    try:
        return ModelServiceStatus.model_validate(status)
    except ValidationError:
        return None


def _same_shape(previous: Applied, plan: Plan, digests: dict[tuple[str, str], str]) -> bool:
    """The same children by kind and name, and the same Deployments kept: nothing to prune."""
    return previous.digests.keys() == digests.keys() and previous.plan.keep == plan.keep


def _same_status(a: dict, b: dict) -> bool:
    strip = lambda s: {**s, "conditions": [{k: v for k, v in c.items() if k != "lastTransitionTime"}
                                           for c in s.get("conditions", [])]}
    return strip(a) == strip(b)
