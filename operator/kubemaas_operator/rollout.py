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
from dataclasses import dataclass
from datetime import datetime

from kubemaas_operator.api import ModelService, ModelServiceStatus, Variant, VariantStatus
from kubemaas_operator.builders.deployment import canary_deployment_name
from kubemaas_operator.builders.image import RuntimeImages
from kubemaas_operator.builders.layout import Track, VariantLayout
from kubemaas_operator.builders.naming import variant_child_name
from kubemaas_operator.builders.replicas import replicas_by_variant
from kubemaas_operator.builders.revision import (
    STABLE,
    combined_revision,
    variant_revisions,
)
from kubemaas_operator.observed import ObservedDeployment


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


def _find_stable(observed: list[ObservedDeployment], record: VariantStatus | None,
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
class _VariantRollout:
    """One variant mid-decision: its stable Deployment (observed, or the name it gets), the
    canary's, and every other Deployment it still has. Private to the rollout: the plan that
    leaves this module is a VariantLayout."""

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
                   observed: list[ObservedDeployment], record: VariantStatus | None) -> _VariantRollout:
    stable = _find_stable(observed, record, desired)
    if stable is None:
        name = variant_child_name(ms.name, variant.name)
        return _VariantRollout(variant, replicas, desired, None, name, desired, [d for d in observed if d.name != name])
    # A Deployment made before revisions were labelled counts as running the spec.
    revision = stable.revision or desired
    others = [d for d in observed if d.name != stable.name]
    state = _VariantRollout(variant, replicas, desired, stable, stable.name, revision, others)
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


def _steady_layout(v: _VariantRollout, canary_strategy: bool) -> VariantLayout:
    """The variant runs the spec in its stable Deployment. Under Canary an earlier revision
    (a reverted canary) stays until the stable one has its pods back; switching to
    RollingUpdate during a canary ends it at once."""
    stable = Track(v.stable_name, v.desired, v.replicas)
    at_strength = not canary_strategy or _at_strength(v.stable, v.replicas, v.desired)
    keep = () if at_strength else tuple(d.name for d in v.others)
    return VariantLayout(v.spec.name, v.spec.weight, v.replicas, stable, keep=keep, quantization=v.spec.quantization)


def _step_weight(steps: Sequence, step: int) -> int:
    return steps[step - 1].weight if 1 <= step <= len(steps) else (100 if step > len(steps) else 0)


def plan_rollout(ms: ModelService, runtime_image: RuntimeImages | str, observed: Sequence[ObservedDeployment],
                 record: ModelServiceStatus | None, now: datetime) -> RolloutPlan:
    """``record``: the status the ModelService carries, read back (the rollout a restarted
    operator resumes from)."""
    record = record or ModelServiceStatus()
    strategy = ms.spec.rollout.strategy
    states = _variant_states(ms, runtime_image, observed, record)
    desired = combined_revision({s.spec.name: s.desired for s in states})
    changing = [s for s in states if s.changing]
    if not changing:
        return _steady_plan(strategy, states, desired)
    steps = ms.spec.rollout.canary_steps
    step, started = _resumed_step(record, desired, steps)
    progress = _progress(changing, steps, desired, step, started, now)
    if progress.step > len(steps) and progress.reached:
        return _promoted(strategy, states, desired)
    # A step once routed stays routed while every canary keeps a pod (an autoscaler moving the
    # total, one pod restarting): its weight holds and its pause runs; it ends only when reached.
    started = progress.started if progress.reached or _alive(changing) else None
    routed = progress.reached or started is not None
    weight = _step_weight(steps, progress.step if routed else progress.step - 1)
    message = progress.message or _waiting_message(changing, steps, progress.step, desired, weight)
    layouts = tuple(_canary_layout(s, steps, progress.step, weight) if s.changing else _steady_layout(s, True)
                    for s in states)
    stable_revision = combined_revision({s.spec.name: s.stable_revision for s in states})
    return RolloutPlan(strategy, layouts, progress.phase, stable_revision, canary_revision=desired,
                       step=progress.step, steps=len(steps), canary_weight=weight,
                       step_started_at=started if routed else None, message=message)


def _variant_states(ms: ModelService, runtime_image: RuntimeImages | str, observed: Sequence[ObservedDeployment],
                    record: ModelServiceStatus) -> list[_VariantRollout]:
    split = replicas_by_variant(ms.spec.replicas, ms.spec.variants)
    desired = variant_revisions(ms, runtime_image)
    canary = ms.spec.rollout.strategy == "Canary"
    recorded = {v.name: v for v in record.variants}
    return [_variant_state(ms, v, split[v.name], desired[v.name], canary,
                           [d for d in observed if d.variant == v.name], recorded.get(v.name))
            for v in ms.spec.variants]


def _steady_plan(strategy: str, states: list[_VariantRollout], revision: str) -> RolloutPlan:
    """No variant changing: each runs the spec in its stable Deployment; earlier revisions
    kept (a reverted canary) keep the rollout Progressing until they are gone."""
    layouts = tuple(_steady_layout(s, strategy == "Canary") for s in states)
    retiring = any(layout.keep for layout in layouts)
    message = ("The spec matches the stable revision again: the earlier revision's pods are "
               "removed once the stable ones are back at strength." if retiring else "")
    return RolloutPlan(strategy, layouts, "Progressing" if retiring else "Complete", revision, message=message)


def _resumed_step(record: ModelServiceStatus, revision: str, steps: Sequence) -> tuple[int, datetime | None]:
    """The step (and when it took effect) status recorded for this canary; step 1 for a new one."""
    rollout = record.rollout
    if rollout is not None and rollout.canary_revision == revision and (rollout.step or 0) >= 1:
        return min(rollout.step or 1, len(steps) + 1), rollout.step_started_at
    return 1, None


def _reached(changing: list[_VariantRollout], steps: Sequence, step: int) -> bool:
    """Every changing variant's canary runs the spec with the step's pods all available."""
    return all(
        s.canary is not None and s.canary.revision == s.desired and s.canary.rolled_out
        and s.canary.replicas == canary_replicas(s.replicas, _step_weight(steps, step))
        for s in changing
    )


def _alive(changing: list[_VariantRollout]) -> bool:
    return all(s.canary is not None and s.canary.revision == s.desired and s.canary.available > 0
               for s in changing)


@dataclass(frozen=True)
class _Progress:
    step: int
    started: datetime | None  # when the step's weight took effect
    reached: bool  # the step's pods are all available
    phase: str = "Progressing"
    message: str = ""


def _progress(changing: list[_VariantRollout], steps: Sequence, revision: str, step: int,
              started: datetime | None, now: datetime) -> _Progress:
    """Where the canary is now: a reached step holds, pauses, or (its pause over) gives way to
    the next one."""
    if not _reached(changing, steps, step):
        return _Progress(step, started, reached=False)
    started = started or now
    if step > len(steps):
        return _Progress(step, started, reached=True)
    current = steps[step - 1]
    if current.held:
        return _Progress(step, started, True, "Held", (
            f"Step {step}/{len(steps)}: {current.weight}% of the changed variants' traffic "
            f"on revision {revision}, held: give spec.rollout.steps[{step - 1}] a "
            "pauseSeconds (or remove that step) to go on, or revert the spec to roll back."))
    pause = current.pause_seconds or 0
    elapsed = (now - started).total_seconds()
    if elapsed >= pause:
        reached = _reached(changing, steps, step + 1)
        return _Progress(step + 1, now if reached else None, reached)
    return _Progress(step, started, True, message=(
        f"Step {step}/{len(steps)}: {current.weight}% on revision {revision}; "
        f"pausing {int(pause - elapsed)} s more before the next step."))


def _waiting_message(changing: list[_VariantRollout], steps: Sequence, step: int, revision: str, weight: int) -> str:
    waiting = ", ".join(
        f"{s.spec.name} {min(s.canary.available, s.canary.replicas) if s.canary else 0}/"
        f"{canary_replicas(s.replicas, _step_weight(steps, step))}" for s in changing)
    target = "promotion" if step > len(steps) else f"step {step}/{len(steps)}"
    return (f"Canary of revision {revision}, {target}: waiting for its pods to be "
            f"available ({waiting}); {weight}% of the changed variants' traffic is on it.")


def _canary_layout(s: _VariantRollout, steps: Sequence, step: int, weight: int) -> VariantLayout:
    """The stable Deployment (only scaled) gives up as many pods as the canary has available
    for the step, keeping at least one; the canary's Deployment is applied at the step's size."""
    pods = canary_replicas(s.replicas, _step_weight(steps, step))
    canary_available = 0
    if s.canary is not None and s.canary.revision == s.desired:
        canary_available = min(s.canary.available, pods, s.canary.replicas)
    return VariantLayout(
        s.spec.name, s.spec.weight, s.replicas,
        Track(s.stable_name, s.stable_revision, max(1, s.replicas - canary_available), apply=False),
        Track(s.canary_name or "", s.desired, pods), canary_weight=weight,
        keep=tuple(d.name for d in s.others), quantization=s.spec.quantization,
    )


def _promoted(strategy: str, states: list[_VariantRollout], revision: str) -> RolloutPlan:
    """The canary's Deployments become the stable ones (relabelled, not replaced); the old
    stable ones go, their replacements being at full strength already."""
    layouts = []
    for s in states:
        if not s.changing:
            layouts.append(_steady_layout(s, True))
            continue
        layouts.append(VariantLayout(s.spec.name, s.spec.weight, s.replicas,
                                     Track(s.canary_name or "", s.desired, s.replicas),
                                     quantization=s.spec.quantization))
    return RolloutPlan(strategy, tuple(layouts), "Complete", revision,
                       message=f"Revision {revision} was promoted after its last canary step.")
