"""Which Deployments each variant runs, with how many pods, and how its traffic splits between
the stable revision and a canary: a pure function of the spec, the observed Deployments, the
rollout record kept in status, and the time.

The rules (docs/operator.md, "Rollouts"):

- A variant's revision is a hash of what shapes its pods (`builders.revision`). When it
  changes under `RollingUpdate`, the variant's Deployment rolls in place (surge first).
- Under `Canary`, the changed variants get a second Deployment for the new revision, named
  `<name>-<variant>-<revision>`. Each step scales it to `ceil(n * weight / 100)` of the
  variant's `n` pods; the stable Deployment gives up only as many pods as the canary has
  available, so capacity never dips. Once the canary's pods for a step are available, the step's
  weight is routed to it (exact through a Gateway, by pod count otherwise) and its pause runs;
  a step without `pauseSeconds` holds until the spec advances it. After the last step the
  canary takes all `n` pods and all traffic and becomes the stable Deployment: its pods are the
  ones that keep serving, nothing restarts.
- A spec that goes back to the stable revision (a git revert) ends the canary: the stable
  Deployment scales back to `n` and the canary is removed once the stable has them available.
- Deployments of neither the stable nor the canary revision (a canary replaced by a newer
  change, the old stable after promotion) are kept until the variant is at strength again.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

from kubemaas_operator.api import ModelService, Variant
from kubemaas_operator.builders.deployment import canary_deployment_name
from kubemaas_operator.builders.layout import Track, VariantLayout
from kubemaas_operator.builders.naming import VARIANT_LABEL, variant_child_name
from kubemaas_operator.builders.replicas import replicas_by_variant
from kubemaas_operator.builders.revision import (
    REVISION_LABEL,
    STABLE,
    TRACK_LABEL,
    combined_revision,
    variant_revisions,
)
from kubemaas_operator.observe import deployment_rolled_out


@dataclass(frozen=True)
class ObservedDeployment:
    """A Deployment of the ModelService as the watch last saw it."""

    name: str
    variant: str
    revision: str | None = None  # None: made before revisions were labelled
    track: str | None = None
    replicas: int = 0  # spec.replicas
    available: int = 0
    rolled_out: bool = False  # every pod updated to its template and available

    @classmethod
    def from_object(cls, obj: dict) -> ObservedDeployment | None:
        meta = obj.get("metadata", {})
        labels = meta.get("labels") or {}
        if VARIANT_LABEL not in labels:
            return None
        return cls(name=meta["name"], variant=labels[VARIANT_LABEL], revision=labels.get(REVISION_LABEL),
                   track=labels.get(TRACK_LABEL), replicas=(obj.get("spec") or {}).get("replicas", 1),
                   available=(obj.get("status") or {}).get("availableReplicas", 0),
                   rolled_out=deployment_rolled_out(obj))


@dataclass(frozen=True)
class VariantRecord:
    """What status says a variant runs (so a restarted operator picks the rollout up)."""

    revision: str | None = None
    deployment: str | None = None
    canary_revision: str | None = None
    canary_deployment: str | None = None


@dataclass(frozen=True)
class RolloutRecord:
    variants: dict[str, VariantRecord] = field(default_factory=dict)
    canary_revision: str | None = None
    step: int = 0
    step_started_at: datetime | None = None

    @classmethod
    def from_status(cls, status: dict | None) -> RolloutRecord:
        status = status or {}
        variants = {
            v["name"]: VariantRecord(v.get("revision"), v.get("deployment"), v.get("canaryRevision"),
                                     v.get("canaryDeployment"))
            for v in status.get("variants") or [] if "name" in v
        }
        rollout = status.get("rollout") or {}
        started = rollout.get("stepStartedAt")
        return cls(
            variants=variants, canary_revision=rollout.get("canaryRevision"), step=rollout.get("step") or 0,
            step_started_at=datetime.fromisoformat(started) if started else None,
        )


@dataclass(frozen=True)
class RolloutPlan:
    strategy: str
    variants: tuple[VariantLayout, ...]
    phase: str  # Complete | Progressing | Held
    stable_revision: str
    canary_revision: str | None = None
    step: int | None = None
    steps: int | None = None
    canary_weight: int | None = None
    step_started_at: datetime | None = None
    message: str = ""

    @property
    def in_canary(self) -> bool:
        return self.canary_revision is not None


def canary_replicas(variant_replicas: int, weight: int) -> int:
    """Pods of the new revision at a step of `weight` percent: enough for its share, at least one."""
    if variant_replicas <= 0:
        return 0
    if weight >= 100:
        return variant_replicas
    return min(variant_replicas, max(1, math.ceil(variant_replicas * weight / 100)))


def _find_stable(observed: list[ObservedDeployment], record: VariantRecord | None,
                 desired: str) -> ObservedDeployment | None:
    """The Deployment serving the stable revision: the one status names, else the one labelled
    stable, else one made before tracks were labelled, else one already running the spec."""
    by_name = {d.name: d for d in observed}
    if record and record.deployment in by_name:
        return by_name[record.deployment]
    labelled = sorted((d for d in observed if d.track == STABLE), key=lambda d: (d.revision != desired, d.name))
    if labelled:
        return labelled[0]
    legacy = [d for d in observed if d.track is None]
    if legacy:
        return legacy[0]
    matching = [d for d in observed if d.revision == desired]
    return matching[0] if matching else None


@dataclass
class _Variant:
    spec: Variant
    replicas: int
    desired: str
    stable: ObservedDeployment | None
    stable_name: str
    stable_revision: str
    others: list[ObservedDeployment]
    canary_name: str | None = None
    canary: ObservedDeployment | None = None

    @property
    def changing(self) -> bool:
        return self.canary_name is not None


def _variant_state(ms: ModelService, variant: Variant, replicas: int, desired: str, canary_strategy: bool,
                   observed: list[ObservedDeployment], record: VariantRecord | None) -> _Variant:
    stable = _find_stable(observed, record, desired)
    if stable is None:
        name = variant_child_name(ms.name, variant.name)
        return _Variant(variant, replicas, desired, None, name, desired, [d for d in observed if d.name != name])
    # A Deployment made before revisions were labelled counts as running the spec.
    revision = stable.revision or desired
    others = [d for d in observed if d.name != stable.name]
    state = _Variant(variant, replicas, desired, stable, stable.name, revision, others)
    if canary_strategy and revision != desired and replicas > 0:
        existing = [d for d in others if d.revision == desired]
        if existing:
            state.canary = existing[0]
            state.canary_name = existing[0].name
        else:
            name = canary_deployment_name(ms.name, variant.name, desired)
            state.canary_name = name if name != stable.name else variant_child_name(ms.name, variant.name)
            state.canary = next((d for d in others if d.name == state.canary_name), None)
        state.others = [d for d in others if d.name != state.canary_name]
    return state


def _at_strength(stable: ObservedDeployment | None, replicas: int, revision: str) -> bool:
    """Whether the stable Deployment, running `revision`, has the variant's pods available
    again, so older Deployments can go."""
    if replicas == 0:
        return True
    return (stable is not None and stable.revision in (revision, None) and stable.replicas == replicas
            and stable.available >= replicas)


def _steady_layout(v: _Variant, canary_strategy: bool) -> VariantLayout:
    """The variant runs the spec in its stable Deployment. Under Canary an earlier revision
    (a reverted canary) stays until the stable one has its pods back; switching to
    RollingUpdate during a canary ends it at once."""
    stable = Track(v.stable_name, v.desired, v.replicas)
    at_strength = not canary_strategy or _at_strength(v.stable, v.replicas, v.desired)
    keep = () if at_strength else tuple(d.name for d in v.others)
    return VariantLayout(v.spec.name, v.spec.weight, v.replicas, stable, keep=keep)


def _step_weight(steps: Sequence, step: int) -> int:
    return steps[step - 1].weight if 1 <= step <= len(steps) else (100 if step > len(steps) else 0)


def plan_rollout(ms: ModelService, runtime_image: str, observed: Sequence[ObservedDeployment],
                 record: RolloutRecord | None, now: datetime) -> RolloutPlan:
    record = record or RolloutRecord()
    spec = ms.spec
    strategy = spec.rollout.strategy
    split = replicas_by_variant(spec.replicas, spec.variants)
    desired = variant_revisions(ms, runtime_image)
    states = [
        _variant_state(ms, v, split[v.name], desired[v.name], strategy == "Canary",
                       [d for d in observed if d.variant == v.name], record.variants.get(v.name))
        for v in spec.variants
    ]
    changing = [s for s in states if s.changing]
    stable_revision = combined_revision({s.spec.name: s.stable_revision for s in states})
    if not changing:
        layouts = tuple(_steady_layout(s, strategy == "Canary") for s in states)
        retiring = any(layout.keep for layout in layouts)
        message = ("The spec matches the stable revision again: the earlier revision's pods are "
                   "removed once the stable ones are back at strength." if retiring else "")
        return RolloutPlan(strategy, layouts, "Progressing" if retiring else "Complete",
                           combined_revision(desired), message=message)

    steps = spec.rollout.canary_steps
    canary_revision = combined_revision(desired)
    step, started = 1, None
    if record.canary_revision == canary_revision and record.step >= 1:
        step, started = min(record.step, len(steps) + 1), record.step_started_at

    def reached_at(step: int) -> bool:
        return all(
            s.canary is not None and s.canary.revision == s.desired and s.canary.rolled_out
            and s.canary.replicas == canary_replicas(s.replicas, _step_weight(steps, step))
            for s in changing
        )

    reached = reached_at(step)
    phase, message = "Progressing", ""
    if reached:
        started = started or now
        if step <= len(steps):
            current = steps[step - 1]
            if current.held:
                phase = "Held"
                message = (f"Step {step}/{len(steps)}: {current.weight}% of the changed variants' traffic "
                           f"on revision {canary_revision}, held: give spec.rollout.steps[{step - 1}] a "
                           "pauseSeconds (or remove that step) to go on, or revert the spec to roll back.")
            elif (now - started).total_seconds() >= (current.pause_seconds or 0):
                step = step + 1
                reached = reached_at(step)
                started = now if reached else None
            else:
                left = int((current.pause_seconds or 0) - (now - started).total_seconds())
                message = (f"Step {step}/{len(steps)}: {current.weight}% on revision {canary_revision}; "
                           f"pausing {left} s more before the next step.")
    if step > len(steps) and reached:
        return _promoted(strategy, states, canary_revision)
    # A step once routed stays routed while every canary keeps a pod (an autoscaler moving the
    # total, one pod restarting): its weight holds and its pause runs; it ends only when reached.
    alive = all(s.canary is not None and s.canary.revision == s.desired and s.canary.available > 0
                for s in changing)
    if not reached and not alive:
        started = None
    routed = reached or started is not None
    weight = _step_weight(steps, step) if routed else _step_weight(steps, step - 1)
    if not message:
        waiting = ", ".join(
            f"{s.spec.name} {min(s.canary.available, s.canary.replicas) if s.canary else 0}/"
            f"{canary_replicas(s.replicas, _step_weight(steps, step))}" for s in changing)
        target = "promotion" if step > len(steps) else f"step {step}/{len(steps)}"
        message = (f"Canary of revision {canary_revision}, {target}: waiting for its pods to be "
                   f"available ({waiting}); {weight}% of the changed variants' traffic is on it.")
    planned: list[VariantLayout] = []
    for s in states:
        if not s.changing:
            planned.append(_steady_layout(s, True))
            continue
        pods = canary_replicas(s.replicas, _step_weight(steps, step))
        canary_available = 0
        if s.canary is not None and s.canary.revision == s.desired:
            canary_available = min(s.canary.available, pods, s.canary.replicas)
        stable_target = max(1, s.replicas - canary_available)
        planned.append(VariantLayout(
            s.spec.name, s.spec.weight, s.replicas,
            Track(s.stable_name, s.stable_revision, stable_target, apply=False),
            Track(s.canary_name or "", s.desired, pods), canary_weight=weight,
            keep=tuple(d.name for d in s.others),
        ))
    return RolloutPlan(strategy, tuple(planned), phase, stable_revision, canary_revision=canary_revision,
                       step=step, steps=len(steps), canary_weight=weight,
                       step_started_at=started if routed else None, message=message)


def _promoted(strategy: str, states: list[_Variant], revision: str) -> RolloutPlan:
    """The canary's Deployments become the stable ones (relabelled, not replaced); the old
    stable ones go, their replacements being at full strength already."""
    layouts = []
    for s in states:
        if not s.changing:
            layouts.append(_steady_layout(s, True))
            continue
        layouts.append(VariantLayout(s.spec.name, s.spec.weight, s.replicas,
                                     Track(s.canary_name or "", s.desired, s.replicas)))
    return RolloutPlan(strategy, tuple(layouts), "Complete", revision,
                       message=f"Revision {revision} was promoted after its last canary step.")
