"""The base of every API model: frozen, camelCase on the wire, unknown fields refused."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, WithJsonSchema
from pydantic.alias_generators import to_camel

from kubemaas_operator.api.constants import (
    MAX_PARAMETER_COUNT,
    PARAMETER_COUNT_PATTERN,
    PERCENT_PATTERN,
    QUANTITY_PATTERN,
)


class ApiModel(BaseModel):
    model_config = ConfigDict(
        frozen=True,
        alias_generator=to_camel,
        validate_by_name=True,
        validate_by_alias=True,
        serialize_by_alias=True,
        extra="forbid",
    )

    def to_wire(self) -> dict[str, Any]:
        """The object as the API server stores it: camelCase keys, unset optionals left out."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


# A resource quantity ("2", "500m", "8Gi") or a plain integer, as Kubernetes accepts it.
Quantity = Annotated[
    int | Annotated[str, StringConstraints(pattern=QUANTITY_PATTERN, max_length=64)],
    WithJsonSchema(
        {
            "anyOf": [{"type": "integer"}, {"type": "string"}],
            "x-kubernetes-int-or-string": True,
            "pattern": QUANTITY_PATTERN,
        }
    ),
]

# A model's size: a plain integer or "135M", "7B", "1.5T".
ParameterCount = Annotated[
    Annotated[int, Field(ge=1, le=MAX_PARAMETER_COUNT)]
    | Annotated[str, StringConstraints(pattern=PARAMETER_COUNT_PATTERN, max_length=16)],
    WithJsonSchema(
        {
            "anyOf": [{"type": "integer"}, {"type": "string"}],
            "x-kubernetes-int-or-string": True,
            "pattern": PARAMETER_COUNT_PATTERN,
        }
    ),
]

# An absolute number of pods or a percentage ("25%"), as a Deployment's rolling update takes.
IntOrPercent = Annotated[
    Annotated[int, Field(ge=0, le=1000)] | Annotated[str, StringConstraints(pattern=PERCENT_PATTERN)],
    WithJsonSchema(
        {
            "anyOf": [{"type": "integer"}, {"type": "string"}],
            "x-kubernetes-int-or-string": True,
            "pattern": PERCENT_PATTERN,
        }
    ),
]

# An object passed through to the pod spec as it is (the API server checks it there).
FreeFormObject = Annotated[
    dict[str, Any],
    WithJsonSchema({"type": "object", "x-kubernetes-preserve-unknown-fields": True}),
]

DnsLabel = Annotated[str, StringConstraints(max_length=63, pattern=r"^[a-z]([-a-z0-9]*[a-z0-9])?$")]
DnsSubdomain = Annotated[
    str,
    StringConstraints(
        min_length=1,
        max_length=253,
        pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$",
    ),
]
LabelValue = Annotated[
    str, StringConstraints(max_length=63, pattern=r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
]
LabelKey = Annotated[str, StringConstraints(min_length=1, max_length=316)]
