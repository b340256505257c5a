"""Which runtime image a ModelService's pods run: one policy, for the operator and `render`."""

from __future__ import annotations

from kubemaas_operator.api import ModelService

# An explicit policy to move a ModelService onto the operator's current default runtime image.
IMAGE_POLICY_ANNOTATION = "kubemaas.io/runtime-image-policy"
FOLLOW_OPERATOR = "FollowOperator"


def choose_runtime_image(ms: ModelService, pinned: str | None, default: str) -> str:
    """The spec's image when it names one; else the image already pinned in status (so an
    operator upgrade with a new default restarts nothing); else the operator's default.
    The annotation ``kubemaas.io/runtime-image-policy: FollowOperator`` opts into the default."""
    if ms.spec.runtime.image:
        return ms.spec.runtime.image
    policy = (ms.metadata.annotations or {}).get(IMAGE_POLICY_ANNOTATION)
    if pinned and policy != FOLLOW_OPERATOR:
        return pinned
    return default


def pinned_image(ms: ModelService) -> str | None:
    """The image status says the pods run (None before the operator wrote any)."""
    return ms.status.runtime_image if ms.status is not None else None
