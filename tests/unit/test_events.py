"""Events are posted by the caller through our client; a refused one is dropped, not retried."""

from __future__ import annotations

import pytest
from kubemaas_operator.events import MAX_MESSAGE, build_event, post_event
from kubemaas_operator.kube import ApiError, NamespaceTerminating
from kubemaas_operator.refresh import post_transition

PARENT = {"apiVersion": "kubemaas.io/v1alpha1", "kind": "ModelService",
          "metadata": {"name": "chat", "namespace": "ml", "uid": "u-1"}}


class RecordingKube:
    def __init__(self, error: Exception | None = None) -> None:
        self.events: list[dict] = []
        self.error = error

    def create_event(self, event: dict) -> None:
        self.events.append(event)
        if self.error is not None:
            raise self.error


def test_the_event_names_its_modelservice_and_caps_the_message() -> None:
    event = build_event(PARENT, "Warning", "GPUMemoryInsufficient", "x" * 5000)
    assert event["metadata"] == {"generateName": "chat.", "namespace": "ml"}
    assert event["involvedObject"] == {"apiVersion": "kubemaas.io/v1alpha1", "kind": "ModelService",
                                       "name": "chat", "namespace": "ml", "uid": "u-1"}
    assert (event["type"], event["reason"]) == ("Warning", "GPUMemoryInsufficient")
    assert len(event["message"]) == MAX_MESSAGE


@pytest.mark.parametrize("error", [NamespaceTerminating(403, "being terminated"),
                                   ApiError(500, "etcd away")])
def test_a_refused_event_is_tried_once_and_never_raises(error: Exception) -> None:
    kube = RecordingKube(error)
    post_event(kube, PARENT, "Normal", "AllVariantsAvailable", "ready")  # type: ignore[arg-type]
    assert len(kube.events) == 1


def test_a_ready_transition_posts_one_event_and_no_change_posts_none() -> None:
    kube = RecordingKube()
    ready = [{"type": "Ready", "status": "True", "reason": "AllVariantsAvailable", "message": "ok"}]
    waiting = [{"type": "Ready", "status": "False", "reason": "WaitingForReplicas", "message": "0/1"}]
    post_transition(kube, PARENT, ready, ready)  # type: ignore[arg-type]
    assert kube.events == []
    post_transition(kube, PARENT, ready, waiting)  # type: ignore[arg-type]
    post_transition(kube, PARENT, waiting, [{**waiting[0], "reason": "CrashLoopBackOff"}])  # type: ignore[arg-type]
    assert [(e["type"], e["reason"]) for e in kube.events] == [
        ("Normal", "WaitingForReplicas"), ("Warning", "CrashLoopBackOff")]
