"""What the operator's settings allow a ModelService to run, checked before anything is built:
runtime images from an allowlist, code-bearing model formats only from trusted sources, hub
models at a pinned revision (docs/install.md, "Locking endpoints down").

A refusal is a condition (Ready=False with one of these reasons) and no children at all.
"""

from __future__ import annotations

import fnmatch

from kubemaas_operator.api import ModelService
from kubemaas_operator.builders.image import PinnedImages, choose_runtime_images, operator_images
from kubemaas_operator.engine import resolved_engine
from kubemaas_operator.problem import Problem
from kubemaas_operator.settings import OperatorSettings

CODE_FORMATS = ("torchscript", "exported-program")  # archives whose graphs the runtime executes


def image_repository(image: str) -> str:
    """registry:5000/org/runtime:1.0 -> registry:5000/org/runtime (digest or tag dropped)."""
    name = image.split("@", 1)[0]
    slash = name.rfind("/")
    colon = name.rfind(":")
    return name[:colon] if colon > slash else name


def allowed_image_patterns(settings: OperatorSettings) -> tuple[str, ...]:
    """The operator's images of both flavours, and the allowlist or else any tag or digest of
    their repositories: one policy for the builtin and the vLLM flavour."""
    defaults = tuple(dict.fromkeys((settings.runtime_image, settings.runtime_image_vllm)))
    if settings.allowed_runtime_images:
        return (*defaults, *settings.allowed_runtime_images)
    repositories = dict.fromkeys(image_repository(image) for image in defaults)
    return (*defaults, *(f"{repo}{sep}*" for repo in repositories for sep in (":", "@")))


def image_allowed(image: str, settings: OperatorSettings) -> bool:
    return any(fnmatch.fnmatchcase(image, pattern) for pattern in allowed_image_patterns(settings))


def hf_revision(uri: str) -> str | None:
    repo = uri.removeprefix("hf://")
    return repo.partition("@")[2] or None


def policy_problem(ms: ModelService, settings: OperatorSettings, pinned: PinnedImages | None) -> Problem | None:
    """Why `ms` may not run under these settings, or None."""
    images = choose_runtime_images(ms, pinned or PinnedImages(), operator_images(settings))
    used = dict.fromkeys(images.for_engine(resolved_engine(ms, v)) for v in ms.spec.variants)
    for image in (image for image in used if not image_allowed(image, settings)):
        patterns = ", ".join(allowed_image_patterns(settings))
        return Problem("ImageNotAllowed",
                       f"runtime image {image} is not allowed by the operator (allowed: {patterns}); "
                       "use an allowed image in spec.runtime.image or ask an administrator to allow it "
                       "(operator.allowedRuntimeImages). Nothing was created.")
    model = ms.spec.model
    if model.format in CODE_FORMATS and not model.uri.startswith(settings.trusted_code_sources):
        return Problem("UntrustedModelSource",
                       f"spec.model.format {model.format} is a program the runtime executes, and "
                       f"{model.uri} is not under a trusted source ({', '.join(settings.trusted_code_sources)}); "
                       "serve it from a trusted source, use safetensors, or ask an administrator "
                       "(operator.trustedCodeSources). Nothing was created.")
    if model.cache == "node" and not settings.model_cache:
        return Problem("ModelCacheDisabled",
                       "spec.model.cache node asks for the node-local model cache, and this operator "
                       "has it off: enable modelCache in the chart (nodes labelled with its node label, "
                       "each with the cache folder) or leave spec.model.cache out. Nothing was created.")
    if model.uri.startswith("hf://") and hf_revision(model.uri) is None:
        return Problem("UnpinnedModelRevision",
                       f"spec.model.uri {model.uri} names no revision, so the files could change under "
                       "the pods; pin one: hf://org/name@<commit>. Nothing was created.")
    # adapters: safetensors only (the runtime never runs their code), hub ones pinned like the model
    for index, adapter in enumerate(ms.spec.adapters or ()):
        if adapter.uri.startswith("hf://") and hf_revision(adapter.uri) is None:
            return Problem("UnpinnedModelRevision",
                           f"spec.adapters[{index}].uri {adapter.uri} names no revision, so the files "
                           "could change under the pods; pin one: hf://org/name@<commit>. Nothing was "
                           "created.")
    return None
