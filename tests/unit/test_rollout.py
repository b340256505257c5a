"""Rollouts as a pure function: revisions, a canary's steps, promotion, revert, the route."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from kubemaas_operator.api import ModelServiceStatus
from kubemaas_operator.api.status import RolloutStatus
from kubemaas_operator.builders import build_children, variant_revisions
from kubemaas_operator.builders.image import PinnedImages
from kubemaas_operator.observed import ObservedDeployment
from kubemaas_operator.reconcile import decide, rollout_status
from kubemaas_operator.rollout import canary_replicas, plan_rollout
from kubemaas_operator.settings import OperatorSettings

from tests.unit.support import make_ms

IMAGE = "registry.example/runtime:1"
NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
SETTINGS = OperatorSettings(runtime_image=IMAGE)
PINNED = PinnedImages(builtin=IMAGE)
TWO_VARIANTS = [{"name": "a", "quantization": "none", "weight": 80},
                {"name": "b", "quantization": "bf16", "weight": 20}]


def _ms(replicas: int = 5, strategy: str = "Canary", steps: list | None = None, batch: int = 32,
        variants: list | None = None, gateway: bool = False):
    rollout: dict = {"strategy": strategy}
    if strategy == "Canary":
        rollout["steps"] = steps if steps is not None else [{"weight": 20, "pauseSeconds": 60},
                                                            {"weight": 50}]
    spec = {"replicas": replicas, "rollout": rollout, "runtime": {"maxBatchSize": batch},
            "variants": variants or TWO_VARIANTS}
    if gateway:
        spec["gateway"] = {"name": "public"}
    return make_ms(spec)


def _revisions(ms) -> dict[str, str]:
    return variant_revisions(ms, IMAGE)


def _dep(name: str, variant: str, revision: str, replicas: int, available: int | None = None,
         track: str = "stable") -> ObservedDeployment:
    available = replicas if available is None else available
    return ObservedDeployment(name, variant, revision, track, replicas, available,
                              rolled_out=available >= replicas)


def _stable_of(ms, replicas: dict[str, int]) -> list[ObservedDeployment]:
    return [_dep(f"m-{v}", v, rev, replicas[v]) for v, rev in _revisions(ms).items()]


def _layout(plan, variant: str):
    return next(layout for layout in plan.variants if layout.name == variant)


def _record(plan) -> ModelServiceStatus:
    """What the operator reads back from the status it wrote for ``plan``."""
    return ModelServiceStatus.model_validate(decide_plan_status(plan))


def _at_step(canary_revision: str, step: int) -> ModelServiceStatus:
    return ModelServiceStatus(rollout=RolloutStatus(strategy="Canary", phase="Progressing",
                                                    canary_revision=canary_revision, step=step))


def decide_plan_status(rollout_plan) -> dict:
    variants = []
    for layout in rollout_plan.variants:
        entry = {"name": layout.name, "quantization": "none", "weight": layout.weight,
                 "revision": layout.stable.revision, "deployment": layout.stable.deployment}
        if layout.canary:
            entry.update(canaryRevision=layout.canary.revision, canaryDeployment=layout.canary.deployment)
        variants.append(entry)

    class _P:  # rollout_status reads only .rollout
        rollout = rollout_plan
    return {"variants": variants, "rollout": rollout_status(_P).to_wire()}


# --- revisions ------------------------------------------------------------------------------

def test_a_revision_changes_with_what_shapes_pods_and_only_that() -> None:
    base = _revisions(_ms())
    assert _revisions(_ms(replicas=9)) == base                       # scale
    assert _revisions(_ms(strategy="RollingUpdate")) == base         # rollout settings
    assert _revisions(_ms(variants=[{**TWO_VARIANTS[0], "weight": 50},
                                    {**TWO_VARIANTS[1], "weight": 50}])) == base  # weights
    changed = _revisions(_ms(batch=64))
    assert changed["a"] != base["a"] and changed["b"] != base["b"]
    one = _revisions(_ms(variants=[TWO_VARIANTS[0], {**TWO_VARIANTS[1], "quantization": "fp16"}]))
    assert one["a"] == base["a"] and one["b"] != base["b"]           # only that variant
    ms = _ms()
    assert variant_revisions(ms, "other:2")["a"] != base["a"]  # the runtime image
    assert all(len(r) == 6 for r in base.values())


@pytest.mark.parametrize(("replicas", "weight", "expected"), [
    (5, 20, 1), (4, 20, 1), (10, 25, 3), (10, 50, 5), (1, 10, 1), (3, 99, 3), (4, 100, 4), (0, 50, 0),
])
def test_canary_pods_cover_their_share_with_at_least_one(replicas, weight, expected) -> None:
    assert canary_replicas(replicas, weight) == expected


# --- steady state and RollingUpdate ---------------------------------------------------------

def test_nothing_observed_is_the_steady_state_render_prints() -> None:
    ms = _ms()
    plan = plan_rollout(ms, IMAGE, (), None, NOW)
    assert plan.phase == "Complete" and not plan.in_canary
    assert [(v.stable.deployment, v.stable.replicas, v.canary) for v in plan.variants] == [
        ("m-a", 4, None), ("m-b", 1, None)]
    deps = [c for c in build_children(ms, SETTINGS, IMAGE, plan.variants) if c["kind"] == "Deployment"]
    offline = [c for c in build_children(ms, SETTINGS, IMAGE) if c["kind"] == "Deployment"]
    assert deps == offline
    labels = deps[0]["spec"]["template"]["metadata"]["labels"]
    assert labels["kubemaas.io/revision"] == _revisions(ms)["a"]
    assert deps[0]["metadata"]["labels"]["kubemaas.io/track"] == "stable"
    assert "kubemaas.io/revision" not in deps[0]["spec"]["selector"]["matchLabels"]  # selectors never change


def test_rolling_update_rolls_the_changed_variant_in_place() -> None:
    old = _ms(strategy="RollingUpdate")
    new = _ms(strategy="RollingUpdate", variants=[TWO_VARIANTS[0], {**TWO_VARIANTS[1], "quantization": "fp16"}])
    plan = plan_rollout(new, IMAGE, _stable_of(old, {"a": 4, "b": 1}), None, NOW)
    b = _layout(plan, "b")
    assert (b.stable.deployment, b.stable.revision, b.stable.apply, b.canary) == (
        "m-b", _revisions(new)["b"], True, None)


def test_surge_first_is_the_default() -> None:
    dep = next(c for c in build_children(make_ms(), SETTINGS, IMAGE) if c["kind"] == "Deployment")
    assert dep["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}


# --- a canary walking its steps -------------------------------------------------------------

def _canary_start():
    old = _ms(batch=32)
    new = _ms(batch=64)
    observed = _stable_of(old, {"a": 4, "b": 1})
    return old, new, observed


def test_a_changed_revision_starts_a_canary_beside_the_stable_deployment() -> None:
    old, new, observed = _canary_start()
    plan = plan_rollout(new, IMAGE, observed, None, NOW)
    rev = _revisions(new)
    assert plan.in_canary and plan.phase == "Progressing" and (plan.step, plan.steps) == (1, 2)
    assert plan.canary_weight == 0  # no traffic before its pods are available
    a = _layout(plan, "a")
    assert (a.stable.deployment, a.stable.revision, a.stable.replicas, a.stable.apply) == (
        "m-a", _revisions(old)["a"], 4, False)   # untouched template, full strength
    assert (a.canary.deployment, a.canary.revision, a.canary.replicas) == (f"m-a-{rev['a']}", rev["a"], 1)
    b = _layout(plan, "b")
    assert (b.stable.replicas, b.canary.replicas) == (1, 1)  # one pod each: the stable keeps serving
    children = build_children(new, SETTINGS, IMAGE, plan.variants)
    names = {c["metadata"]["name"] for c in children if c["kind"] == "Deployment"}
    assert names == {f"m-a-{rev['a']}", f"m-b-{rev['b']}"}  # the stable ones are only scaled
    full = decide(new, SETTINGS, PINNED, observed, None, NOW)
    assert set(full.scales) == {("m-a", 4), ("m-b", 1)} and {"m-a", "m-b"} <= full.keep


def test_a_step_is_routed_once_its_pods_are_available_then_pauses() -> None:
    _, new, observed = _canary_start()
    rev = _revisions(new)
    first = plan_rollout(new, IMAGE, observed, None, NOW)
    canaries = [_dep(f"m-a-{rev['a']}", "a", rev["a"], 1, track="canary"),
                _dep(f"m-b-{rev['b']}", "b", rev["b"], 1, track="canary")]
    later = NOW + timedelta(seconds=10)
    plan = plan_rollout(new, IMAGE, observed + canaries, _record(first), later)
    assert (plan.step, plan.canary_weight, plan.step_started_at) == (1, 20, later)
    assert _layout(plan, "a").stable.replicas == 3  # gives up one pod for the available canary pod
    assert "pausing 60 s" in plan.message
    # within the pause nothing moves; after it, step 2 scales the canary up
    held_on = plan_rollout(new, IMAGE, observed + canaries, _record(plan), later + timedelta(seconds=30))
    assert (held_on.step, held_on.step_started_at) == (1, later)
    nxt = plan_rollout(new, IMAGE, observed + canaries, _record(plan), later + timedelta(seconds=61))
    assert (nxt.step, nxt.canary_weight) == (2, 20)  # step 2's weight waits for its pods
    assert _layout(nxt, "a").canary.replicas == 2 and _layout(nxt, "b").canary.replicas == 1


def test_a_step_without_pause_is_held_until_the_spec_advances_it() -> None:
    _, new, observed = _canary_start()
    rev = _revisions(new)
    canaries = [_dep(f"m-a-{rev['a']}", "a", rev["a"], 2, track="canary"),
                _dep(f"m-b-{rev['b']}", "b", rev["b"], 1, track="canary")]
    record = _at_step(plan_rollout(new, IMAGE, observed, None, NOW).canary_revision, 2)
    plan = plan_rollout(new, IMAGE, observed + canaries, record, NOW + timedelta(days=3))
    assert (plan.phase, plan.step, plan.canary_weight) == ("Held", 2, 50)
    assert "spec.rollout.steps[1]" in plan.message
    # the spec gives the held step a pause: the same revision goes on (no new canary)
    advanced = _ms(batch=64, steps=[{"weight": 20, "pauseSeconds": 60}, {"weight": 50, "pauseSeconds": 0}])
    assert _revisions(advanced) == rev
    plan2 = plan_rollout(advanced, IMAGE, observed + canaries, _record(plan), NOW + timedelta(days=3))
    assert plan2.step == 3 and _layout(plan2, "a").canary.replicas == 4  # promotion: all the pods


def test_after_the_last_step_the_canary_becomes_stable_without_restarting() -> None:
    _, new, observed = _canary_start()
    rev = _revisions(new)
    canaries = [_dep(f"m-a-{rev['a']}", "a", rev["a"], 4, track="canary"),
                _dep(f"m-b-{rev['b']}", "b", rev["b"], 1, track="canary")]
    canary_revision = plan_rollout(new, IMAGE, observed, None, NOW).canary_revision
    plan = plan_rollout(new, IMAGE, observed + canaries, _at_step(canary_revision, 3), NOW)
    assert plan.phase == "Complete" and not plan.in_canary and plan.stable_revision == canary_revision
    a = _layout(plan, "a")
    assert (a.stable.deployment, a.stable.replicas, a.stable.apply, a.keep) == (f"m-a-{rev['a']}", 4, True, ())
    full = decide(new, SETTINGS, PINNED, observed + canaries, _at_step(canary_revision, 3), NOW)
    assert "m-a" not in full.keep and not full.scales   # the old stable goes
    # next time round, status names the promoted Deployment as the stable one: nothing changes
    again = plan_rollout(new, IMAGE, [_dep(f"m-a-{rev['a']}", "a", rev["a"], 4, track="canary"),
                                      _dep(f"m-b-{rev['b']}", "b", rev["b"], 1, track="canary")],
                         _record(plan), NOW)
    assert again.phase == "Complete" and _layout(again, "a").stable.deployment == f"m-a-{rev['a']}"


def test_a_revert_rolls_back_to_the_stable_pods_without_a_new_rollout() -> None:
    old, new, observed = _canary_start()
    rev_new = _revisions(new)
    canary = _dep(f"m-a-{rev_new['a']}", "a", rev_new["a"], 1, track="canary")
    shrunk = [_dep("m-a", "a", _revisions(old)["a"], 3), observed[1]]
    plan = plan_rollout(old, IMAGE, shrunk + [canary], None, NOW)
    a = _layout(plan, "a")
    assert not plan.in_canary and plan.phase == "Progressing"
    assert (a.stable.deployment, a.stable.replicas, a.stable.apply) == ("m-a", 4, True)
    assert a.keep == (canary.name,)   # kept until the stable is back at 4
    back = plan_rollout(old, IMAGE, observed + [canary], None, NOW)
    assert back.phase == "Complete" and _layout(back, "a").keep == ()


def test_a_newer_change_during_a_canary_replaces_the_canary() -> None:
    _, mid, observed = _canary_start()
    rev_mid = _revisions(mid)
    old_canary = _dep(f"m-a-{rev_mid['a']}", "a", rev_mid["a"], 1, track="canary")
    newest = _ms(batch=128)
    first = plan_rollout(mid, IMAGE, observed, None, NOW)
    plan = plan_rollout(newest, IMAGE, observed + [old_canary], _record(first), NOW)
    a = _layout(plan, "a")
    assert plan.step == 1 and a.canary.revision == _revisions(newest)["a"]
    assert a.keep == (old_canary.name,) and a.stable.replicas == 4


def test_only_changed_variants_get_a_canary() -> None:
    old = _ms()
    new = _ms(variants=[TWO_VARIANTS[0], {**TWO_VARIANTS[1], "quantization": "fp16"}])
    plan = plan_rollout(new, IMAGE, _stable_of(old, {"a": 4, "b": 1}), None, NOW)
    assert _layout(plan, "a").canary is None and _layout(plan, "a").stable.apply
    assert _layout(plan, "b").canary is not None


# --- traffic through a gateway ----------------------------------------------------------------

def test_the_route_splits_each_variant_between_revisions_exactly() -> None:
    old, new = _ms(gateway=True), _ms(gateway=True, batch=64)
    rev_old, rev_new = _revisions(old), _revisions(new)
    observed = _stable_of(old, {"a": 4, "b": 1}) + [
        _dep(f"m-a-{rev_new['a']}", "a", rev_new["a"], 1, track="canary"),
        _dep(f"m-b-{rev_new['b']}", "b", rev_new["b"], 1, track="canary")]
    first = plan_rollout(new, IMAGE, _stable_of(old, {"a": 4, "b": 1}), None, NOW)
    plan = plan_rollout(new, IMAGE, observed, _record(first), NOW)
    children = build_children(new, SETTINGS, IMAGE, plan.variants)
    route = next(c for c in children if c["kind"] == "HTTPRoute")
    weights = {b["name"]: b["weight"] for b in route["spec"]["rules"][0]["backendRefs"]}
    assert weights == {f"m-a-{rev_old['a']}": 6400, f"m-a-{rev_new['a']}": 1600,
                       f"m-b-{rev_old['b']}": 1600, f"m-b-{rev_new['b']}": 400}
    services = {c["metadata"]["name"]: c["spec"]["selector"] for c in children if c["kind"] == "Service"}
    assert services[f"m-a-{rev_new['a']}"]["kubemaas.io/revision"] == rev_new["a"]
    steady = build_children(old, SETTINGS, IMAGE)
    route = next(c for c in steady if c["kind"] == "HTTPRoute")
    assert {b["name"]: b["weight"] for b in route["spec"]["rules"][0]["backendRefs"]} == {
        f"m-a-{rev_old['a']}": 8000, f"m-b-{rev_old['b']}": 2000}


def test_rolling_update_routes_to_the_variant_services() -> None:
    route = next(c for c in build_children(_ms(strategy="RollingUpdate", gateway=True), SETTINGS, IMAGE)
                 if c["kind"] == "HTTPRoute")
    assert {b["name"]: b["weight"] for b in route["spec"]["rules"][0]["backendRefs"]} == {"m-a": 80, "m-b": 20}


# --- the record status keeps --------------------------------------------------------------------

def test_status_keeps_what_a_restarted_operator_resumes_from() -> None:
    _, new, observed = _canary_start()
    rev = _revisions(new)
    canaries = [_dep(f"m-a-{rev['a']}", "a", rev["a"], 1, track="canary"),
                _dep(f"m-b-{rev['b']}", "b", rev["b"], 1, track="canary")]
    plan = plan_rollout(new, IMAGE, observed + canaries, _record(plan_rollout(new, IMAGE, observed, None, NOW)), NOW)
    record = _record(plan)
    assert record.rollout is not None
    assert (record.rollout.canary_revision, record.rollout.step, record.rollout.step_started_at) == \
        (plan.canary_revision, 1, NOW)
    a = next(v for v in record.variants if v.name == "a")
    assert a.deployment == "m-a" and a.canary_deployment == f"m-a-{rev['a']}"


def test_switching_to_rolling_update_during_a_canary_ends_it_at_once() -> None:
    old, new, observed = _canary_start()
    rev_new = _revisions(new)
    canary = _dep(f"m-a-{rev_new['a']}", "a", rev_new["a"], 1, track="canary")
    shrunk = [_dep("m-a", "a", _revisions(old)["a"], 3), observed[1]]
    rolling = _ms(batch=64, strategy="RollingUpdate")
    plan = plan_rollout(rolling, IMAGE, shrunk + [canary], None, NOW)
    a = _layout(plan, "a")
    assert (a.stable.deployment, a.stable.revision, a.stable.replicas, a.stable.apply, a.keep) == (
        "m-a", _revisions(rolling)["a"], 4, True, ())


def test_an_autoscaler_moving_the_total_mid_canary_rescales_both_tracks() -> None:
    _, new, observed = _canary_start()
    rev = _revisions(new)
    canary = _dep(f"m-a-{rev['a']}", "a", rev["a"], 1, track="canary")
    first = plan_rollout(new, IMAGE, observed, None, NOW)
    bigger = _ms(batch=64, replicas=10)           # the HPA wrote /scale: 10 pods, 8 for variant a
    plan = plan_rollout(bigger, IMAGE, observed + [canary], _record(first), NOW)
    a = _layout(plan, "a")
    assert (a.replicas, a.canary.replicas, a.stable.replicas) == (8, 2, 7)  # 20% of 8; one canary pod up
    assert plan.step == 1 and plan.canary_weight == 0   # the step was never routed: not yet
    # a step already routed keeps its weight while the canary scales for the new total
    canaries = [canary, _dep(f"m-b-{rev['b']}", "b", rev["b"], 1, track="canary")]
    routed = plan_rollout(new, IMAGE, observed + canaries, _record(first), NOW)
    assert routed.canary_weight == 20
    later = NOW + timedelta(seconds=120)
    moved = plan_rollout(bigger, IMAGE, observed + canaries, _record(routed), later)
    assert (moved.step, moved.canary_weight, moved.step_started_at) == (1, 20, NOW)
    assert _layout(moved, "a").canary.replicas == 2 and "waiting for its pods" in moved.message
    # ...and loses it when a canary has no pod left
    gone = [_dep(f"m-a-{rev['a']}", "a", rev["a"], 1, available=0, track="canary"), canaries[1]]
    dead = plan_rollout(new, IMAGE, observed + gone, _record(routed), later)
    assert (dead.canary_weight, dead.step_started_at) == (0, None)


def test_canary_without_steps_holds_one_step_of_ten_percent() -> None:
    ms = _ms(batch=64, steps=[])
    assert [(s.weight, s.held) for s in ms.spec.rollout.canary_steps] == [(10, True)]
    old = _ms(batch=32, steps=[])
    rev = _revisions(ms)
    observed = _stable_of(old, {"a": 4, "b": 1}) + [
        _dep(f"m-a-{rev['a']}", "a", rev["a"], 1, track="canary"),
        _dep(f"m-b-{rev['b']}", "b", rev["b"], 1, track="canary")]
    plan = plan_rollout(ms, IMAGE, observed, None, NOW)
    assert (plan.phase, plan.step, plan.steps, plan.canary_weight) == ("Held", 1, 1, 10)


def test_a_revert_through_a_gateway_sends_all_traffic_back_at_once() -> None:
    old, new = _ms(gateway=True), _ms(gateway=True, batch=64)
    rev_old, rev_new = _revisions(old), _revisions(new)
    canary = _dep(f"m-a-{rev_new['a']}", "a", rev_new["a"], 1, track="canary")
    observed = [_dep("m-a", "a", rev_old["a"], 3), _dep("m-b", "b", rev_old["b"], 1), canary]
    plan = plan_rollout(old, IMAGE, observed, None, NOW)
    assert _layout(plan, "a").keep == (canary.name,)  # its pods stay until the stable is back at 4...
    route = next(c for c in build_children(old, SETTINGS, IMAGE, plan.variants) if c["kind"] == "HTTPRoute")
    weights = {b["name"]: b["weight"] for b in route["spec"]["rules"][0]["backendRefs"]}
    assert weights == {f"m-a-{rev_old['a']}": 8000, f"m-b-{rev_old['b']}": 2000}  # ...but get no traffic


class _RecordingKube:
    """The KubeClient calls a reconcile makes, against nothing: which writes it would send."""

    def __init__(self) -> None:
        self.writes: list[tuple[str, str]] = []

    def get(self, kind, namespace, name):
        return None

    def apply(self, obj, force=False):
        self.writes.append(("apply", f"{obj['kind']}/{obj['metadata']['name']}"))
        return {**obj, "metadata": {**obj["metadata"], "generation": 1}}

    def scale_deployment(self, namespace, name, replicas):
        self.writes.append(("scale", f"{name}={replicas}"))

    def list(self, kind, namespace, selector):
        self.writes.append(("list", kind))
        return []

    def delete(self, *args):
        self.writes.append(("delete", args[1]))


def test_the_canary_timer_writes_only_what_changed_since_the_last_plan() -> None:
    from kubemaas_operator.reconcile import Reconciler
    from kubemaas_operator.store import Store

    _, new, observed = _canary_start()
    kube = _RecordingKube()
    reconciler, store = Reconciler(kube, SETTINGS), Store()
    reconciler.reconcile(store, new, PINNED, observed=observed)
    assert ("scale", "m-a=4") in kube.writes and ("apply", "HTTPRoute/m") not in kube.writes
    kube.writes.clear()
    reconciler.reconcile(store, new, PINNED, observed=observed, only_changes=True)
    assert kube.writes == []   # nothing moved: no apply, no scale, no listing for stale children
    rev = _revisions(new)
    up = observed + [_dep(f"m-a-{rev['a']}", "a", rev["a"], 1, track="canary"),
                     _dep(f"m-b-{rev['b']}", "b", rev["b"], 1, track="canary")]
    reconciler.reconcile(store, new, PINNED, observed=up, only_changes=True)
    assert kube.writes == [("scale", "m-a=3")]   # the canary pod is up: the stable gives one back
