"""A variant's revision: a short hash of everything in the spec that shapes its pods.

Two specs with the same revision run the same pods, so a change that keeps the revision (a new
weight, replica count, autoscaling or rollout setting) never starts new pods, and a canary
starts only when a revision changes. The hash covers the model, resources, scheduling, runtime
settings (with the runtime image the operator resolved), and the variant's name and
quantization. Fields at their defaults are left out, so a field added to the API later, at its
default, does not change any existing revision (an operator upgrade starts no canary).
"""

from __future__ import annotations

import hashlib
import json

from kubemaas_operator.api import ModelService, Variant
from kubemaas_operator.api.constants import REVISION_LENGTH

REVISION_LABEL = "kubemaas.io/revision"
TRACK_LABEL = "kubemaas.io/track"  # stable | canary, on Deployments only (never on pods)
STABLE = "stable"
CANARY = "canary"


def variant_revision(ms: ModelService, variant: Variant, runtime_image: str) -> str:
    spec = ms.spec
    shaping = {
        "model": spec.model.model_dump(mode="json", by_alias=True, exclude_defaults=True),
        "resources": spec.resources.model_dump(mode="json", by_alias=True, exclude_defaults=True),
        "scheduling": spec.scheduling.model_dump(mode="json", by_alias=True, exclude_defaults=True),
        "runtime": {
            **spec.runtime.model_dump(mode="json", by_alias=True, exclude_defaults=True, exclude={"image"}),
            "image": runtime_image,
        },
        "variant": [variant.name, variant.quantization],
    }
    canonical = json.dumps(shaping, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:REVISION_LENGTH]


def combined_revision(revisions: dict[str, str]) -> str:
    """One revision for the whole ModelService: a hash of its variants' revisions, or with
    one variant that variant's own (the one its Deployment and pods are named and labelled by)."""
    if len(revisions) == 1:
        return next(iter(revisions.values()))
    canonical = ",".join(f"{name}={rev}" for name, rev in sorted(revisions.items()))
    return hashlib.sha256(canonical.encode()).hexdigest()[:REVISION_LENGTH]
