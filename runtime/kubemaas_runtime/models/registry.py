"""Which model class serves which --format (and --task)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from kubemaas_runtime.errors import ModelLoadFailed
from kubemaas_runtime.models.base import Model, ModelOptions

if TYPE_CHECKING:
    from kubemaas_runtime.generation.model import GenerativeBase


def create_model(format: str, options: ModelOptions) -> Model | GenerativeBase:
    """An unloaded model of the class for `format`; imports only what that format needs."""
    if options.task == "text-generation" or format == "gguf":
        from kubemaas_runtime.generation.model import create_generative_model

        return create_generative_model(options, format)
    if format == "torchscript":
        from kubemaas_runtime.models.tensor_models import TorchScriptModel

        return TorchScriptModel(options)
    if format == "exported-program":
        from kubemaas_runtime.models.tensor_models import ExportedProgramModel

        return ExportedProgramModel(options)
    if format == "safetensors":
        from kubemaas_runtime.models.tensor_models import SafetensorsModel

        return SafetensorsModel(options)
    if format == "transformers":
        from kubemaas_runtime.models import text_models

        kinds = {"feature-extraction": text_models.FeatureExtractionModel,
                 "text-classification": text_models.TextClassificationModel}
        if options.task not in kinds:
            raise ModelLoadFailed(f"transformers task {options.task!r} is not supported "
                                  f"(supported: {', '.join(kinds)})")
        return kinds[options.task](options)
    raise ModelLoadFailed(f"unknown model format {format!r}")
