"""Who may reach a ModelService: the runtime's bearer-token auth and the namespaces its
NetworkPolicy admits (docs/install.md, "Locking endpoints down")."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, StringConstraints

from kubemaas_operator.api.base import ApiModel, DnsLabel, DnsSubdomain

MAX_ALLOWED_NAMESPACES = 32


class RuntimeAuth(ApiModel):
    """Bearer-token auth on the model's metadata and inference routes (/v2/models/*, /v1/*)."""

    secret_name: DnsSubdomain = Field(
        description=(
            "Secret in the ModelService's namespace holding the token. Its key is mounted into "
            "the runtime as a file; clients send 'Authorization: Bearer <token>'."
        )
    )
    key: Annotated[str, StringConstraints(min_length=1, max_length=253,
                                          pattern=r"^[-._a-zA-Z0-9]+$")] = Field(
        default="token", description="Key of the Secret that holds the token."
    )


class NetworkAccess(ApiModel):
    """Namespaces whose pods may connect to the model's pods, beside the ModelService's own
    namespace, its Gateway's and the metrics scraper's (when the operator creates
    NetworkPolicies)."""

    allowed_namespaces: Annotated[list[DnsLabel], Field(max_length=MAX_ALLOWED_NAMESPACES)] = Field(
        default_factory=list,
        description="More namespaces admitted to the model's port.",
        json_schema_extra={"x-kubernetes-list-type": "set"},
    )
