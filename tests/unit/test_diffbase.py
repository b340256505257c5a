"""The lean diff base decides exactly as kopf's own: the same essence from the same body."""

import copy

import kopf
import pytest
from kubemaas_operator.diffbase import LeanDiffBaseStorage, lean
from kubemaas_operator.handlers import KOPF_PREFIX

KEY = "last-handled-configuration"


def body() -> dict:
    return {
        "apiVersion": "kubemaas.io/v1alpha1", "kind": "ModelService",
        "metadata": {
            "name": "m", "namespace": "ns", "uid": "u1", "generation": 3, "resourceVersion": "42",
            "labels": {"team": "a"},
            "annotations": {"kubemaas.io/runtime-image-policy": "FollowOperator",
                            "kubectl.kubernetes.io/last-applied-configuration": "{...}",
                            f"{KOPF_PREFIX}/{KEY}": '{"spec":{"replicas":1}}\n'},
            "managedFields": [{"manager": "kubectl", "fieldsV1": {"f:spec": {"f:replicas": {}}}}],
        },
        "spec": {"model": {"uri": "hf://x/y"}, "replicas": 2, "variants": [{"name": "a"}]},
        "status": {"conditions": [{"type": "Ready", "status": "True"}], "replicas": 2},
    }


def storages() -> tuple[kopf.AnnotationsDiffBaseStorage, LeanDiffBaseStorage]:
    return (kopf.AnnotationsDiffBaseStorage(prefix=KOPF_PREFIX, key=KEY),
            LeanDiffBaseStorage(kinds=["ModelService"], prefix=KOPF_PREFIX, key=KEY))


def test_the_essence_is_kopfs_own() -> None:
    theirs, ours = storages()
    raw = body()
    expected = theirs.build(body=kopf.Body(copy.deepcopy(raw)))
    got = ours.build(body=kopf.Body(raw))
    assert got == expected
    assert got["spec"]["replicas"] == 2 and got["metadata"]["labels"] == {"team": "a"}
    assert "status" not in got and f"{KOPF_PREFIX}/{KEY}" not in got["metadata"]["annotations"]


@pytest.mark.parametrize("change", ["spec", "label", "annotation", "status"])
def test_a_change_is_seen_as_kopf_sees_it(change: str) -> None:
    theirs, ours = storages()
    before, after = body(), body()
    if change == "spec":
        after["spec"]["replicas"] = 3
    elif change == "label":
        after["metadata"]["labels"]["team"] = "b"
    elif change == "annotation":
        after["metadata"]["annotations"]["kubemaas.io/runtime-image-policy"] = "Pinned"
    else:
        after["status"]["replicas"] = 0
    for storage in (theirs, ours):
        old, new = (storage.build(body=kopf.Body(copy.deepcopy(b))) for b in (before, after))
        assert (old != new) == (change != "status"), type(storage).__name__


def test_the_essence_is_a_copy_and_the_body_is_untouched() -> None:
    _, ours = storages()
    raw = body()
    pristine = copy.deepcopy(raw)
    essence = ours.build(body=kopf.Body(raw))
    essence["spec"]["variants"][0]["name"] = "changed"
    assert raw == pristine


def test_lean_drops_only_status_and_managed_fields() -> None:
    slim = lean(body())
    assert "status" not in slim and "managedFields" not in slim["metadata"]
    assert slim["metadata"]["uid"] == "u1" and slim["spec"]["replicas"] == 2


def test_extra_fields_take_kopfs_full_path() -> None:
    theirs, ours = storages()
    raw = body()
    fields = ["status.replicas"]
    assert ours.build(body=kopf.Body(raw), extra_fields=fields) == \
        theirs.build(body=kopf.Body(copy.deepcopy(raw)), extra_fields=fields)
    assert ours.build(body=kopf.Body(raw), extra_fields=fields)["status"] == {"replicas": 2}


def test_kinds_without_change_handlers_get_an_empty_essence() -> None:
    _, ours = storages()
    deployment = {**body(), "apiVersion": "apps/v1", "kind": "Deployment"}
    assert ours.build(body=kopf.Body(deployment)) == {}


def test_the_essence_is_kept_in_memory_and_never_patched() -> None:
    """No annotation PATCH after a handled change: the essence is remembered by uid, and the
    next event of the same object compares against it as kopf compares against its annotation."""
    _, ours = storages()
    first = kopf.Body(body())
    assert ours.fetch(body=first) is None  # never handled: kopf's create
    essence = ours.build(body=first)
    patch = kopf.Patch()
    ours.store(body=first, patch=patch, essence=essence)
    assert not patch
    assert ours.fetch(body=kopf.Body(body())) == essence  # the same object again: no diff
    changed = body()
    changed["spec"]["replicas"] = 5
    assert ours.fetch(body=kopf.Body(changed)) != ours.build(body=kopf.Body(changed))  # an update


def test_an_annotation_from_an_earlier_operator_is_not_read_and_others_are_apart() -> None:
    _, ours = storages()
    raw = body()  # carries a last-handled annotation
    assert ours.fetch(body=kopf.Body(raw)) is None
    ours.store(body=kopf.Body(raw), patch=kopf.Patch(), essence=ours.build(body=kopf.Body(raw)))
    other = body()
    other["metadata"]["uid"] = "u2"
    assert ours.fetch(body=kopf.Body(other)) is None  # another object (uid) has none of its own


def test_a_forgotten_object_has_no_essence() -> None:
    _, ours = storages()
    raw = body()
    ours.store(body=kopf.Body(raw), patch=kopf.Patch(), essence=ours.build(body=kopf.Body(raw)))
    ours.forget("u1")
    ours.forget("never-seen")
    assert ours.fetch(body=kopf.Body(raw)) is None
