"""Status from observed children: a pure function, so every reason is a table test.

Inputs are the raw objects the API server returned (Deployments and Pods labelled with the
ModelService), plus what the reconcile decided; the output is the ModelService's ``status``.
Reasons come from real pod state, in the order a person should fix them: a name conflict or a
missing CRD first, then pods the scheduler cannot place, images that cannot be pulled, a
runtime that exits (with its own termination message), and finally waiting for readiness.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime

from kubemaas_operator.api import VariantStatus, format_variant_summary
from kubemaas_operator.builders.layout import VariantLayout
from kubemaas_operator.builders.naming import VARIANT_LABEL
from kubemaas_operator.builders.revision import REVISION_LABEL
from kubemaas_operator.redact import safe_termination_line

_CAMEL_REASON = re.compile(r"^([A-Z][A-Za-z0-9]+):\s*(.*)$", re.DOTALL)
_PULL_REASONS = {"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull"}


@dataclass(frozen=True)
class VariantPlan:
    """A variant as the reconcile laid it out: its stable Deployment and, during a canary, the
    new revision's."""

    quantization: str
    layout: VariantLayout

    name = property(lambda self: self.layout.name)
    weight = property(lambda self: self.layout.weight)
    replicas = property(lambda self: self.layout.replicas)  # its share of spec.replicas
    deployment = property(lambda self: self.layout.stable.deployment)
    revision = property(lambda self: self.layout.stable.revision)
    stable_target = property(lambda self: self.layout.stable.replicas)  # the stable Deployment's pods now
    canary_weight = property(lambda self: self.layout.canary_weight)

    @property
    def canary_deployment(self) -> str | None:
        return self.layout.canary.deployment if self.layout.canary else None

    @property
    def canary_revision(self) -> str | None:
        return self.layout.canary.revision if self.layout.canary else None

    @property
    def canary_replicas(self) -> int:
        return self.layout.canary.replicas if self.layout.canary else 0


@dataclass(frozen=True)
class Problem:
    """A reason that blocks readiness, already phrased for a person."""

    reason: str
    message: str


@dataclass(frozen=True)
class Observation:
    name: str
    namespace: str
    generation: int
    selector: str
    url: str
    runtime_image: str
    variants: tuple[VariantPlan, ...]
    deployments: dict[str, dict] = field(default_factory=dict)  # by Deployment name
    pods: tuple[dict, ...] = ()
    blocking: Problem | None = None  # NameConflict, KedaNotInstalled, ...
    # the generation each Deployment got from our last apply: an observed copy older than it
    # (a watch event still in flight) must not count as rolled out
    applied_generations: dict[str, int] = field(default_factory=dict)
    gateway: bool = False  # traffic splits by weight through an HTTPRoute, not by ready pods
    rollout: dict | None = None  # status.rollout as the plan has it


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


def deployment_rolled_out(dep: dict, applied_generation: int = 0) -> bool:
    """Whether the Deployment controller reports every pod updated to the current template and
    available; a copy older than our last apply (a watch event in flight) is not."""
    spec_replicas = dep.get("spec", {}).get("replicas", 1)
    st = dep.get("status", {})
    generation = dep["metadata"].get("generation", 0)
    return (
        generation >= applied_generation
        and st.get("observedGeneration", 0) >= generation
        and st.get("updatedReplicas", 0) >= spec_replicas
        and st.get("replicas", 0) == spec_replicas
        and st.get("availableReplicas", 0) >= spec_replicas
    )


def _deployment_counts(dep: dict | None, applied_generation: int = 0) -> tuple[int, int, bool]:
    """(replicas, ready, rolled_out) of a Deployment as its controller reports them."""
    if not dep:
        return 0, 0, False
    st = dep.get("status", {})
    return st.get("replicas", 0), st.get("readyReplicas", 0), deployment_rolled_out(dep, applied_generation)


def _condition(ctype: str, ok: bool, reason: str, message: str, generation: int,
               previous: dict[str, dict], now: str) -> dict:
    status = "True" if ok else "False"
    prev = previous.get(ctype) or {}
    changed = prev.get("status") != status
    return {
        "type": ctype, "status": status, "reason": reason, "message": message,
        "observedGeneration": generation,
        "lastTransitionTime": now if changed else prev.get("lastTransitionTime", now),
    }


def _surge_problem(pod: dict, problem: Problem, plans: dict[str, VariantPlan],
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


def _traffic(plans: tuple[VariantPlan, ...], ready: dict[str, int], canary_ready: dict[str, int],
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


def compute_status(obs: Observation, previous_conditions: list[dict] | None = None,
                   now: datetime | None = None) -> dict:
    stamp = (now or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")
    previous = {c["type"]: c for c in previous_conditions or []}
    total_replicas = desired_total = 0
    all_rolled_out = True
    planned = set()
    ready: dict[str, int] = {}
    canary_ready: dict[str, int] = {}
    for plan in obs.variants:
        replicas, stable_ready, rolled_out = _deployment_counts(
            obs.deployments.get(plan.deployment), obs.applied_generations.get(plan.deployment, 0))
        all_rolled_out &= rolled_out or plan.stable_target == 0 and replicas == 0
        planned.add(plan.deployment)
        total_replicas += replicas
        ready[plan.name] = stable_ready
        canary_ready[plan.name] = 0
        desired_total += plan.replicas
        if plan.canary_deployment:
            c_replicas, c_ready, c_rolled_out = _deployment_counts(
                obs.deployments.get(plan.canary_deployment),
                obs.applied_generations.get(plan.canary_deployment, 0))
            all_rolled_out &= c_rolled_out
            planned.add(plan.canary_deployment)
            total_replicas += c_replicas
            ready[plan.name] += c_ready
            canary_ready[plan.name] = c_ready
    for name, dep in obs.deployments.items():  # earlier revisions being retired still serve
        variant = ((dep.get("metadata") or {}).get("labels") or {}).get(VARIANT_LABEL)
        if name not in planned and variant in ready:
            replicas, retiring_ready, _ = _deployment_counts(dep)
            total_replicas += replicas
            ready[variant] += retiring_ready
            all_rolled_out = False
    total_ready = sum(ready.values())
    traffic = _traffic(obs.variants, ready, canary_ready, obs.gateway)
    variants = []
    for plan in obs.variants:
        share, canary_share = traffic[plan.name]
        entry: dict = {"name": plan.name, "quantization": plan.quantization, "weight": plan.weight,
                       "replicas": plan.replicas, "readyReplicas": ready[plan.name], "trafficShare": share}
        if plan.revision:
            entry.update(revision=plan.revision, deployment=plan.deployment)
        if plan.canary_deployment:
            entry.update(canaryRevision=plan.canary_revision, canaryDeployment=plan.canary_deployment,
                         canaryReplicas=plan.canary_replicas, canaryReadyReplicas=canary_ready[plan.name],
                         canaryTrafficShare=canary_share)
        variants.append(entry)

    plans = {p.name: p for p in obs.variants}
    problems = []
    for pod in obs.pods:
        found = pod_problem(pod)
        if found and found.reason == "Unschedulable":
            found = _surge_problem(pod, found, plans, obs.deployments)
        if found:
            problems.append(found)
    problem = obs.blocking or (problems[0] if problems else None)
    available = all_rolled_out and total_ready >= desired_total and obs.blocking is None
    gen = obs.generation
    rollout = dict(obs.rollout) if obs.rollout else {}
    if rollout and rollout.get("phase") == "Complete" and not available:
        rollout["phase"] = "Progressing"
    canary = bool(rollout.get("canaryRevision"))

    if problem:
        degraded = _condition("Degraded", True, problem.reason, problem.message, gen, previous, stamp)
    else:
        degraded = _condition("Degraded", False, "AsExpected", "No problems observed.", gen,
                              previous, stamp)
    if canary and not problem:
        held = rollout["phase"] == "Held"
        progressing = _condition("Progressing", True, "CanaryHeld" if held else "CanaryProgressing",
                                 rollout.get("message", ""), gen, previous, stamp)
    elif available:
        progressing = _condition("Progressing", False, "RolloutComplete",
                                 "Every variant runs the current spec.", gen, previous, stamp)
    else:
        progressing = _condition("Progressing", obs.blocking is None, "RollingOut",
                                 f"{total_ready}/{desired_total} replicas ready; waiting for the "
                                 "Deployments to roll out.", gen, previous, stamp)
    if available and canary:
        ready_cond = _condition("Ready", True, "CanaryInProgress",
                                f"{total_ready} replicas ready, stable and canary; {rollout.get('message', '')}",
                                gen, previous, stamp)
    elif available:
        ready_cond = _condition("Ready", True, "AllVariantsAvailable",
                                f"{total_ready}/{desired_total} replicas ready across "
                                f"{len(obs.variants)} variant(s).", gen, previous, stamp)
    elif problem:
        ready_cond = _condition("Ready", False, problem.reason, problem.message, gen, previous, stamp)
    else:
        ready_cond = _condition("Ready", False, "WaitingForReplicas",
                                f"{total_ready}/{desired_total} replicas ready.", gen, previous, stamp)
    status = {
        "observedGeneration": gen,
        "replicas": total_replicas,
        "readyReplicas": total_ready,
        "selector": obs.selector,
        "url": obs.url,
        "runtimeImage": obs.runtime_image,
        "conditions": [ready_cond, progressing, degraded],
        "variants": variants,
        "variantSummary": format_variant_summary([VariantStatus.model_validate(v) for v in variants]),
    }
    if rollout:
        status["rollout"] = rollout
    return status
