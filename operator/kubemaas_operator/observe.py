"""Status from observed children: a pure function, so every reason is a table test.

Inputs are the raw objects the watches hold (Deployments and Pods labelled with the
ModelService), plus what the reconcile decided; the output is the ModelService's ``status`` as
its API model (:class:`~kubemaas_operator.api.ModelServiceStatus`), built in named steps:
count the pods per variant, find the first problem, then the three conditions.
Reasons come from real pod state, in the order a person should fix them: a name conflict or a
missing CRD first, then pods the scheduler cannot place, images that cannot be pulled, a
runtime that exits (with its own termination message), and finally waiting for readiness.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal

from kubemaas_operator.api import (
    Condition,
    GroupStatus,
    ModelServiceStatus,
    VariantStatus,
    format_variant_summary,
)
from kubemaas_operator.api.status import RolloutStatus
from kubemaas_operator.builders.image import RuntimeImages
from kubemaas_operator.builders.layout import VariantLayout
from kubemaas_operator.builders.naming import VARIANT_LABEL
from kubemaas_operator.builders.revision import REVISION_LABEL
from kubemaas_operator.cache_status import cache_summary, node_cache_statuses
from kubemaas_operator.observed import ObservedGroup, deployment_rolled_out, observed_groups
from kubemaas_operator.problem import Problem
from kubemaas_operator.redact import safe_termination_line

_CAMEL_REASON = re.compile(r"^([A-Z][A-Za-z0-9]+):\s*(.*)$", re.DOTALL)
_PULL_REASONS = {"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull"}


@dataclass(frozen=True)
class Observation:
    name: str
    namespace: str
    generation: int
    selector: str
    url: str
    runtime_image: RuntimeImages
    variants: tuple[VariantLayout, ...]
    deployments: dict[str, dict] = field(default_factory=dict)  # by Deployment name
    pods: tuple[dict, ...] = ()
    blocking: Problem | None = None  # NameConflict, KedaNotInstalled, ...
    # the generation each Deployment got from our last apply: an observed copy older than it
    # (a watch event still in flight) must not count as rolled out
    applied_generations: dict[str, int] = field(default_factory=dict)
    gateway: bool = False  # traffic splits by weight through an HTTPRoute, not by ready pods
    rollout: RolloutStatus | None = None  # status.rollout as the plan has it
    refused: bool = False  # `blocking` is the reconcile's refusal of variants (they get no pods)
    adapters: tuple[str, ...] | None = None  # spec.adapters' names (the pods' ConfigMap)
    cache_key: str | None = None  # model.cache node: the entry the pods use (cache_status.py)


def pod_problem(pod: dict) -> Problem | None:
    """Why this pod is not serving, from its own status, or None."""
    status = pod.get("status", {})
    for cond in status.get("conditions", []):
        if cond.get("type") == "PodScheduled" and cond.get("status") == "False":
            message = cond.get("message", "")
            if "persistentvolumeclaim" in message and "not found" in message:
                return Problem("PersistentVolumeClaimNotFound", message)
            return Problem("Unschedulable", message or cond.get("reason", "pod cannot be scheduled"))
    for cs in status.get("initContainerStatuses", []) + status.get("containerStatuses", []):
        waiting = (cs.get("state") or {}).get("waiting") or {}
        reason = waiting.get("reason", "")
        if reason in _PULL_REASONS:
            return Problem("ImagePullFailed",
                           f"image {cs.get('image', '?')} cannot be pulled: "
                           f"{waiting.get('message') or reason}")
        terminated = (cs.get("lastState") or {}).get("terminated") or \
            (cs.get("state") or {}).get("terminated") or {}
        if reason == "CrashLoopBackOff" or (terminated and terminated.get("exitCode", 0) != 0):
            return _crash_problem(cs, terminated)
    return None


def _crash_problem(container_status: dict, terminated: dict) -> Problem:
    first = safe_termination_line(terminated.get("message") or "")
    match = _CAMEL_REASON.match(first)
    if match:  # the runtime's own one-line reason, e.g. "ModelLoadFailed: no config.json"
        return Problem(match.group(1), f"container {container_status.get('name')}: {first}")
    detail = first or terminated.get("reason") or "exited"
    return Problem("CrashLoopBackOff",
                   f"container {container_status.get('name')} keeps exiting "
                   f"(exit code {terminated.get('exitCode', '?')}): {detail}")


def _deployment_counts(dep: dict | None, applied_generation: int = 0) -> tuple[int, int, bool]:
    """(replicas, ready, rolled_out) of a Deployment as its controller reports them."""
    if not dep:
        return 0, 0, False
    st = dep.get("status", {})
    return st.get("replicas", 0), st.get("readyReplicas", 0), deployment_rolled_out(dep, applied_generation)


def _surge_problem(pod: dict, problem: Problem, plans: dict[str, VariantLayout],
                  deployments: dict[str, dict]) -> Problem:
    """An unschedulable pod of the new revision while the variant's earlier pods keep their
    capacity is a surge that cannot be placed, not an outage: say so, and what to do."""
    labels = (pod.get("metadata") or {}).get("labels") or {}
    plan = plans.get(labels.get(VARIANT_LABEL, ""))
    revision = labels.get(REVISION_LABEL)
    if plan is None or revision is None:
        return problem
    stable = (deployments.get(plan.deployment) or {}).get("status", {})
    if plan.canary_revision == revision:
        serving = stable.get("availableReplicas", 0)
        if serving < plan.stable_target:
            return problem
        return Problem("SurgeUnschedulable",
                       f"The canary pod of variant {plan.name} (revision {revision}) cannot be scheduled: "
                       f"{problem.message}. The stable revision keeps its {serving} pod(s) and all their "
                       "traffic until it can; free capacity (for example GPUs) or revert the spec.")
    # the Deployment has its pods available and still runs this one: an extra (surge) pod
    if revision == plan.revision and stable.get("availableReplicas", 0) >= plan.stable_target > 0:
        return Problem("SurgeUnschedulable",
                       f"A new pod of variant {plan.name} (revision {revision}) cannot be scheduled: "
                       f"{problem.message}. The {stable.get('availableReplicas', 0)} pod(s) of the earlier "
                       "revision keep serving, so capacity is unchanged, but the rollout waits. Free "
                       "capacity (for example GPUs), or set spec.rollout.maxUnavailable to 1 to replace "
                       "pods in place (one pod fewer while each is replaced).")
    return problem


def _traffic(plans: tuple[VariantLayout, ...], ready: dict[str, int], canary_ready: dict[str, int],
             gateway: bool) -> dict[str, tuple[float, float | None]]:
    """(share of all traffic, of which the canary's) per variant."""
    total_ready = sum(ready.values())
    out: dict[str, tuple[float, float | None]] = {}
    for plan in plans:
        canary: float | None = None
        if gateway:
            share = float(plan.weight)
            if plan.canary_deployment:
                canary = round(plan.weight * plan.canary_weight / 100, 1)
        else:  # the Service spreads requests over every ready pod
            share = round(100 * ready[plan.name] / total_ready) if total_ready else 0
            if plan.canary_deployment:
                canary = round(100 * canary_ready[plan.name] / total_ready) if total_ready else 0
        out[plan.name] = (share, canary)
    return out


@dataclass
class _Counts:
    """Pods per variant as the Deployment controller reports them."""

    replicas: int = 0  # every pod of the ModelService's Deployments
    desired: int = 0  # spec.replicas over the variants
    rolled_out: bool = True  # every Deployment runs its template with all pods available
    ready: dict[str, int] = field(default_factory=dict)  # variant -> ready pods (all revisions)
    canary_ready: dict[str, int] = field(default_factory=dict)  # variant -> the canary's ready pods

    @property
    def total_ready(self) -> int:
        return sum(self.ready.values())


def _groups_of(obs: Observation, variant: str) -> list[ObservedGroup]:
    return [g for g in observed_groups((), obs.pods) if g.variant == variant]


def _count_groups(counts: _Counts, obs: Observation, plan: VariantLayout) -> None:
    """A variant over several nodes: replicas are groups, a group is ready when all its pods
    are; rolled out when every group the plan writes is ready and no earlier one is left."""
    groups = _groups_of(obs, plan.name)
    wanted = set(plan.groups or ())
    counts.replicas += len(groups)
    counts.ready[plan.name] = sum(g.ready(plan.nodes) for g in groups)
    counts.canary_ready[plan.name] = 0
    counts.desired += plan.replicas
    current = sum(1 for g in groups if g.name in wanted and g.ready(plan.nodes))
    counts.rolled_out &= current >= plan.replicas and all(g.name in wanted for g in groups)


def _retiring_groups(obs: Observation, plan: VariantLayout) -> list[ObservedGroup]:
    """A variant on one node: the groups left from when it ran over several nodes, kept serving
    until its Deployment is ready (reconcile.py). Their node count is no longer in the spec: a
    group counts as ready when every pod of it that is seen is."""
    return [] if plan.groups is not None else _groups_of(obs, plan.name)


def _group_statuses(obs: Observation, plan: VariantLayout) -> list[GroupStatus] | None:
    """The variant's groups: those it runs over several nodes, or on one node those retiring."""
    if plan.groups is None:
        groups = _retiring_groups(obs, plan)
        if not groups:
            return None
    else:
        seen = {g.name: g for g in _groups_of(obs, plan.name)}
        for name in plan.groups:
            seen.setdefault(name, ObservedGroup(name, plan.name, plan.revision))
        groups = sorted(seen.values(), key=lambda g: g.name)
    return [GroupStatus(name=g.name, revision=g.revision, nodes=g.pods, ready_nodes=g.ready_pods,
                        ready=g.ready(plan.nodes if plan.groups is not None else g.pods)) for g in groups]


def _count(obs: Observation) -> _Counts:
    counts = _Counts()
    planned = set()
    for plan in obs.variants:
        if plan.groups is not None:
            _count_groups(counts, obs, plan)
            continue
        replicas, ready, rolled_out = _deployment_counts(
            obs.deployments.get(plan.deployment), obs.applied_generations.get(plan.deployment, 0))
        counts.rolled_out &= rolled_out or plan.stable_target == 0 and replicas == 0
        planned.add(plan.deployment)
        counts.replicas += replicas
        counts.ready[plan.name] = ready
        counts.canary_ready[plan.name] = 0
        counts.desired += plan.replicas
        if retiring := _retiring_groups(obs, plan):  # they still serve, as retiring Deployments do
            counts.replicas += len(retiring)
            counts.ready[plan.name] += sum(g.ready(g.pods) for g in retiring)
            counts.rolled_out = False
        if plan.canary_deployment:
            c_replicas, c_ready, c_rolled_out = _deployment_counts(
                obs.deployments.get(plan.canary_deployment),
                obs.applied_generations.get(plan.canary_deployment, 0))
            counts.rolled_out &= c_rolled_out
            planned.add(plan.canary_deployment)
            counts.replicas += c_replicas
            counts.ready[plan.name] += c_ready
            counts.canary_ready[plan.name] = c_ready
    for name, dep in obs.deployments.items():  # earlier revisions being retired still serve
        variant = ((dep.get("metadata") or {}).get("labels") or {}).get(VARIANT_LABEL)
        if name not in planned and variant in counts.ready:
            replicas, retiring_ready, _ = _deployment_counts(dep)
            counts.replicas += replicas
            counts.ready[variant] += retiring_ready
            counts.rolled_out = False
    return counts


def _variant_statuses(obs: Observation, counts: _Counts) -> list[VariantStatus]:
    traffic = _traffic(obs.variants, counts.ready, counts.canary_ready, obs.gateway)
    out = []
    for plan in obs.variants:
        share, canary_share = traffic[plan.name]
        canary = plan.canary_deployment is not None
        out.append(VariantStatus(
            name=plan.name, quantization=plan.quantization, weight=plan.weight, replicas=plan.replicas,
            ready_replicas=counts.ready[plan.name], traffic_share=share,
            revision=plan.revision or None,
            canary_revision=plan.canary_revision, canary_deployment=plan.canary_deployment,
            canary_replicas=plan.canary_replicas if canary else None,
            canary_ready_replicas=counts.canary_ready[plan.name] if canary else None,
            canary_traffic_share=canary_share if canary else None,
            groups=_group_statuses(obs, plan),
            deployment=None if plan.groups is not None else (plan.deployment if plan.revision else None),
        ))
    return out


def _first_problem(obs: Observation) -> Problem | None:
    """What blocks readiness, in the order a person should fix it: the reconcile's own
    problem, then the first pod's."""
    if obs.blocking:
        return obs.blocking
    plans = {p.name: p for p in obs.variants}
    for pod in obs.pods:
        found = pod_problem(pod)
        if found and found.reason == "Unschedulable":
            found = _surge_problem(pod, found, plans, obs.deployments)
        if found:
            return found
    return None


@dataclass(frozen=True)
class _Conditions:
    """Conditions for one generation; a condition keeps its lastTransitionTime while its
    status stays as it was."""

    generation: int
    previous: dict[str, Condition]
    now: datetime

    def make(self, ctype: str, ok: bool, reason: str, message: str) -> Condition:
        status: Literal["True", "False"] = "True" if ok else "False"
        prev = self.previous.get(ctype)
        since = prev.last_transition_time if prev is not None and prev.status == status else self.now
        return Condition(type=ctype, status=status, reason=reason, message=message,
                         observed_generation=self.generation, last_transition_time=since)

    def degraded(self, problem: Problem | None) -> Condition:
        if problem:
            return self.make("Degraded", True, problem.reason, problem.message)
        return self.make("Degraded", False, "AsExpected", "No problems observed.")

    def progressing(self, rollout: RolloutStatus | None, problem: Problem | None, available: bool,
                    blocked: bool, counts: _Counts) -> Condition:
        if rollout is not None and rollout.canary_revision and not problem:
            reason = "CanaryHeld" if rollout.phase == "Held" else "CanaryProgressing"
            return self.make("Progressing", True, reason, rollout.message)
        if available:
            return self.make("Progressing", False, "RolloutComplete", "Every variant runs the current spec.")
        return self.make("Progressing", not blocked, "RollingOut",
                         f"{counts.total_ready}/{counts.desired} replicas ready; waiting for the "
                         "Deployments to roll out.")

    def ready(self, rollout: RolloutStatus | None, problem: Problem | None, available: bool,
              counts: _Counts, variants: int) -> Condition:
        if available and rollout is not None and rollout.canary_revision:
            return self.make("Ready", True, "CanaryInProgress",
                             f"{counts.total_ready} replicas ready, stable and canary; {rollout.message}")
        if available:
            return self.make("Ready", True, "AllVariantsAvailable",
                             f"{counts.total_ready}/{counts.desired} replicas ready across {variants} variant(s).")
        if problem:
            return self.make("Ready", False, problem.reason, problem.message)
        return self.make("Ready", False, "WaitingForReplicas", f"{counts.total_ready}/{counts.desired} replicas ready.")


def compute_status(obs: Observation, previous: ModelServiceStatus | None = None,
                   now: datetime | None = None) -> ModelServiceStatus:
    counts = _count(obs)
    variants = _variant_statuses(obs, counts)
    problem = _first_problem(obs)
    available = counts.rolled_out and counts.total_ready >= counts.desired and obs.blocking is None
    rollout = obs.rollout
    if rollout is not None and obs.refused and obs.blocking and not rollout.canary_revision:
        # a refused variant is not on its way: nothing rolls until the spec or the nodes change
        rollout = rollout.model_copy(update={"phase": "Refused", "message": obs.blocking.message[:4096]})
    elif rollout is not None and rollout.phase == "Complete" and not available:
        rollout = rollout.model_copy(update={"phase": "Progressing"})
    cache = None if obs.cache_key is None else node_cache_statuses(obs.pods, obs.cache_key)
    conditions = _Conditions(obs.generation, {c.type: c for c in previous.conditions} if previous else {},
                             (now or datetime.now(UTC)).replace(microsecond=0))
    return ModelServiceStatus(
        observed_generation=obs.generation, replicas=counts.replicas, ready_replicas=counts.total_ready,
        selector=obs.selector, url=obs.url, runtime_image=obs.runtime_image.builtin,
        vllm_runtime_image=obs.runtime_image.vllm,
        conditions=[conditions.ready(rollout, problem, available, counts, len(obs.variants)),
                    conditions.progressing(rollout, problem, available, obs.blocking is not None, counts),
                    conditions.degraded(problem)],
        variants=variants, variant_summary=format_variant_summary(variants), rollout=rollout,
        adapters=None if obs.adapters is None else list(obs.adapters),
        cache=cache, cache_summary=None if cache is None else cache_summary(cache),
    )
