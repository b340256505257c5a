"""The `ModelService` object as a whole: metadata, spec, status."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, StringConstraints, model_validator

from kubemaas_operator.api import rules
from kubemaas_operator.api.base import ApiModel
from kubemaas_operator.api.constants import (
    API_VERSION,
    KIND,
    MAX_CANARY_NAME_LENGTH,
    MAX_NAME_LENGTH,
)
from kubemaas_operator.api.spec import ModelServiceSpec
from kubemaas_operator.api.status import ModelServiceStatus

_NAME_RE = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


class ObjectMeta(ApiModel):
    """The parts of metadata the operator reads; the rest is kept but not interpreted."""

    model_config = ConfigDict(extra="allow")

    name: Annotated[str, StringConstraints(min_length=1, max_length=253)]
    namespace: str | None = None
    uid: str | None = None
    generation: int | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


class ModelService(ApiModel):
    """A served model: `kubemaas.io/v1alpha1` `ModelService`."""

    model_config = ConfigDict(extra="forbid")

    api_version: Literal["kubemaas.io/v1alpha1"] = Field(default=API_VERSION, alias="apiVersion")
    kind: Literal["ModelService"] = KIND
    metadata: ObjectMeta
    spec: ModelServiceSpec
    status: ModelServiceStatus | None = None

    @model_validator(mode="after")
    def _check_name(self) -> ModelService:
        if len(self.metadata.name) > MAX_NAME_LENGTH:
            raise rules.violation(rules.NAME_LENGTH)
        if not _NAME_RE.search(self.metadata.name):
            raise rules.violation(rules.NAME_FORMAT)
        spec = self.spec
        if spec.gateway is not None and spec.rollout.strategy == "Canary" and any(
                len(self.metadata.name) + len(v.name) > MAX_CANARY_NAME_LENGTH for v in spec.variants):
            raise rules.violation(rules.CANARY_SERVICE_NAME_LENGTH)
        if any(adapter.name == self.metadata.name for adapter in spec.adapters or ()):
            raise rules.violation(rules.ADAPTER_NOT_THE_MODEL_NAME)
        return self

    @property
    def name(self) -> str:
        return self.metadata.name

    @property
    def namespace(self) -> str:
        if not self.metadata.namespace:
            raise ValueError(f"ModelService {self.name} has no namespace")
        return self.metadata.namespace

    @classmethod
    def from_body(cls, body: Any) -> ModelService:
        """Parse a ModelService from a dict (a kopf body, a YAML document).

        Raises pydantic.ValidationError; `api.errors.describe_errors` names the fields.
        """
        return cls.model_validate(dict(body))
