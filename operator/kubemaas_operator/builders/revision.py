"""A variant's revision: a short hash of everything in the spec that shapes its pods.

Two specs with the same revision run the same pods, so a change that keeps the revision (a new
weight, replica count, autoscaling or rollout setting) never starts new pods, and a canary
starts only when a revision changes. The hash covers the model, resources, scheduling, runtime
settings (with the runtime image the operator resolved for the variant's engine), and the
variant's name, quantization, engine and compile. Fields at their defaults are left out, so a field added to the API later, at its
default, does not change any existing revision (an operator upgrade starts no canary).
"""

from __future__ import annotations

import hashlib
import json

from kubemaas_operator.api import ModelService, Variant
from kubemaas_operator.api.constants import REVISION_LENGTH
from kubemaas_operator.builders.image import RuntimeImages
from kubemaas_operator.engine import resolved_engine

REVISION_LABEL = "kubemaas.io/revision"
TRACK_LABEL = "kubemaas.io/track"  # stable | canary, on Deployments only (never on pods)
STABLE = "stable"
CANARY = "canary"


def _pod_shape(ms: ModelService, runtime_image: str) -> str:
    """The part every variant shares, as canonical JSON."""
    spec = ms.spec
    dump = lambda model, **kw: model.model_dump(mode="json", by_alias=True, exclude_defaults=True, **kw)
    shape = {
        "model": dump(spec.model), "resources": dump(spec.resources), "scheduling": dump(spec.scheduling),
        "runtime": {**dump(spec.runtime, exclude={"image"}), "image": runtime_image},
    }
    if spec.adapters is not None:  # the adapter machinery shapes the pods; the list itself does not
        shape["adapters"] = "configmap"
    return json.dumps(shape, sort_keys=True, separators=(",", ":"))


def _hash(shape: str, variant: Variant) -> str:
    text = f"{shape}|{variant.name}|{variant.quantization}"
    if variant.engine is not None:  # left out unset, so existing revisions stay as they were
        text += f"|{variant.engine}"
    if variant.compile is not None:
        text += f"|compile={variant.compile}"
    return hashlib.sha256(text.encode()).hexdigest()[:REVISION_LENGTH]


def variant_revisions(ms: ModelService, images: RuntimeImages | str) -> dict[str, str]:
    """{variant name: revision} for every variant (the shared part serialised once per image);
    ``images`` is both flavours, or one image for every variant."""
    images = RuntimeImages.single(images) if isinstance(images, str) else images
    shapes = {image: _pod_shape(ms, image) for image in images.all()}
    return {v.name: _hash(shapes[images.for_engine(resolved_engine(ms, v))], v) for v in ms.spec.variants}


def combined_revision(revisions: dict[str, str]) -> str:
    """One revision for the whole ModelService: a hash of its variants' revisions, or with
    one variant that variant's own (the one its Deployment and pods are named and labelled by)."""
    if len(revisions) == 1:
        return next(iter(revisions.values()))
    canonical = ",".join(f"{name}={rev}" for name, rev in sorted(revisions.items()))
    return hashlib.sha256(canonical.encode()).hexdigest()[:REVISION_LENGTH]
