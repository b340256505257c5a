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
from datetime import datetime, timezone

from kubemaas_operator.api import VariantStatus, format_variant_summary

VARIANT_LABEL = "kubemaas.io/variant"

_CAMEL_REASON = re.compile(r"^([A-Z][A-Za-z0-9]+):\s*(.*)$", re.S)
_PULL_REASONS = {"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull"}


@dataclass(frozen=True)
class VariantPlan:
    name: str
    quantization: str
    weight: int
    replicas: int
    deployment: str


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
    message = (terminated.get("message") or "").strip().splitlines()
    first = message[0] if message else ""
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
    spec_replicas = dep.get("spec", {}).get("replicas", 1)
    st = dep.get("status", {})
    generation = dep["metadata"].get("generation", 0)
    rolled_out = (
        generation >= applied_generation
        and st.get("observedGeneration", 0) >= generation
        and st.get("updatedReplicas", 0) >= spec_replicas
        and st.get("replicas", 0) == spec_replicas
        and st.get("availableReplicas", 0) >= spec_replicas
    )
    return st.get("replicas", 0), st.get("readyReplicas", 0), rolled_out


def _condition(ctype: str, ok: bool, reason: str, message: str, generation: int,
               previous: dict[str, dict], now: str) -> dict:
    status = "True" if ok else "False"
    prev = previous.get(ctype)
    changed = not prev or prev.get("status") != status
    return {
        "type": ctype, "status": status, "reason": reason, "message": message,
        "observedGeneration": generation,
        "lastTransitionTime": now if changed else prev.get("lastTransitionTime", now),
    }


def compute_status(obs: Observation, previous_conditions: list[dict] | None = None,
                   now: datetime | None = None) -> dict:
    stamp = (now or datetime.now(timezone.utc)).strftime("%Y-%m-%dT%H:%M:%SZ")
    previous = {c["type"]: c for c in previous_conditions or []}
    total_ready = total_replicas = desired_total = 0
    all_rolled_out = True
    variants = []
    for plan in obs.variants:
        replicas, ready, rolled_out = _deployment_counts(
            obs.deployments.get(plan.deployment), obs.applied_generations.get(plan.deployment, 0))
        total_replicas += replicas
        total_ready += ready
        desired_total += plan.replicas
        all_rolled_out &= rolled_out or plan.replicas == 0 and replicas == 0
        variants.append({"name": plan.name, "quantization": plan.quantization,
                         "weight": plan.weight, "replicas": plan.replicas, "readyReplicas": ready})
    for entry in variants:  # without a gateway, traffic follows the share of ready pods
        entry["trafficShare"] = round(100 * entry["readyReplicas"] / total_ready) if total_ready else 0

    problems = [p for p in map(pod_problem, obs.pods) if p]
    problem = obs.blocking or (problems[0] if problems else None)
    available = all_rolled_out and total_ready >= desired_total and obs.blocking is None
    gen = obs.generation

    if problem:
        degraded = _condition("Degraded", True, problem.reason, problem.message, gen, previous, stamp)
    else:
        degraded = _condition("Degraded", False, "AsExpected", "No problems observed.", gen,
                              previous, stamp)
    if available:
        progressing = _condition("Progressing", False, "RolloutComplete",
                                 "Every variant runs the current spec.", gen, previous, stamp)
        ready = _condition("Ready", True, "AllVariantsAvailable",
                           f"{total_ready}/{desired_total} replicas ready across "
                           f"{len(obs.variants)} variant(s).", gen, previous, stamp)
    else:
        progressing = _condition("Progressing", obs.blocking is None, "RollingOut",
                                 f"{total_ready}/{desired_total} replicas ready; waiting for the "
                                 "Deployments to roll out.", gen, previous, stamp)
        if problem:
            ready = _condition("Ready", False, problem.reason, problem.message, gen, previous, stamp)
        else:
            ready = _condition("Ready", False, "WaitingForReplicas",
                               f"{total_ready}/{desired_total} replicas ready.", gen, previous,
                               stamp)
    return {
        "observedGeneration": gen,
        "replicas": total_replicas,
        "readyReplicas": total_ready,
        "selector": obs.selector,
        "url": obs.url,
        "runtimeImage": obs.runtime_image,
        "conditions": [ready, progressing, degraded],
        "variants": variants,
        "variantSummary": format_variant_summary([VariantStatus.model_validate(v) for v in variants]),
    }
