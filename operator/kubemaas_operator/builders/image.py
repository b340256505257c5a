"""Which runtime image a ModelService's pods run: one policy, for the operator and `render`.

The runtime comes in two flavours, one per engine (docs/api.md, "Engines"): the builtin
engine's image and the vLLM one. Each variant runs the flavour of its resolved engine; the
policy below is applied to each flavour alike, and status pins each (``runtimeImage`` for
builtin, ``vllmRuntimeImage`` for vLLM).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kubemaas_operator.api import ModelService
from kubemaas_operator.engine import ResolvedEngine
from kubemaas_operator.settings import OperatorSettings

# An explicit policy to move a ModelService onto the operator's current default runtime image.
IMAGE_POLICY_ANNOTATION = "kubemaas.io/runtime-image-policy"
FOLLOW_OPERATOR = "FollowOperator"


@dataclass(frozen=True)
class RuntimeImages:
    """The image of each flavour."""

    builtin: str
    vllm: str

    @classmethod
    def single(cls, image: str) -> RuntimeImages:
        """One image for every flavour (spec.runtime.image names one)."""
        return cls(builtin=image, vllm=image)

    def for_engine(self, engine: ResolvedEngine) -> str:
        return self.vllm if engine == "vllm" else self.builtin

    def all(self) -> tuple[str, ...]:
        return (self.builtin,) if self.builtin == self.vllm else (self.builtin, self.vllm)


@dataclass(frozen=True)
class PinnedImages:
    """The images status says the pods run, per flavour (None: none written yet)."""

    builtin: str | None = None
    vllm: str | None = None

    @classmethod
    def from_status(cls, status: Mapping[str, Any] | None) -> PinnedImages:
        status = status or {}
        return cls(builtin=status.get("runtimeImage") or None, vllm=status.get("vllmRuntimeImage") or None)


def choose_runtime_image(ms: ModelService, pinned: str | None, default: str) -> str:
    """One flavour's image: the spec's image when it names one; else the image already pinned in
    status (so an operator upgrade with a new default restarts nothing); else the operator's
    default. The annotation ``kubemaas.io/runtime-image-policy: FollowOperator`` opts into the
    default."""
    if ms.spec.runtime.image:
        return ms.spec.runtime.image
    policy = (ms.metadata.annotations or {}).get(IMAGE_POLICY_ANNOTATION)
    if pinned and policy != FOLLOW_OPERATOR:
        return pinned
    return default


def operator_images(settings: OperatorSettings) -> RuntimeImages:
    """The operator's default image of each flavour."""
    return RuntimeImages(builtin=settings.runtime_image, vllm=settings.runtime_image_vllm)


def choose_runtime_images(ms: ModelService, pinned: PinnedImages, defaults: RuntimeImages) -> RuntimeImages:
    """Both flavours' images, each by :func:`choose_runtime_image`."""
    return RuntimeImages(builtin=choose_runtime_image(ms, pinned.builtin, defaults.builtin),
                         vllm=choose_runtime_image(ms, pinned.vllm, defaults.vllm))


def pinned_images(ms: ModelService) -> PinnedImages:
    """The images status says the pods run (None before the operator wrote any)."""
    if ms.status is None:
        return PinnedImages()
    return PinnedImages(builtin=ms.status.runtime_image, vllm=ms.status.vllm_runtime_image)
