"""Which Deployments a ModelService's variants run: the steady state, or a canary's layout that
`kubemaas_operator.rollout` plans. The builders turn a layout into children."""

from __future__ import annotations

from dataclasses import dataclass

from kubemaas_operator.api import ModelService
from kubemaas_operator.api.constants import Quantization
from kubemaas_operator.builders.image import RuntimeImages
from kubemaas_operator.builders.naming import variant_child_name
from kubemaas_operator.builders.replicas import replicas_by_variant
from kubemaas_operator.builders.revision import variant_revisions
from kubemaas_operator.builders.services import revision_service_name


@dataclass(frozen=True)
class Track:
    """One Deployment, at `replicas` pods. `apply`: written from the spec; otherwise only scaled
    (the stable Deployment during a canary runs a revision the spec no longer describes)."""

    deployment: str
    revision: str
    replicas: int
    apply: bool = True


@dataclass(frozen=True)
class VariantLayout:
    """A variant as the reconcile lays it out (the one type for it, from the rollout plan to
    status): its stable Deployment and, during a canary, the new revision's."""

    name: str
    weight: int
    replicas: int  # the variant's share of spec.replicas
    stable: Track
    canary: Track | None = None
    canary_weight: int = 0  # percent of this variant's traffic routed to the canary
    keep: tuple[str, ...] = ()  # Deployments of earlier revisions kept until the variant is at strength
    quantization: Quantization = "none"
    # resources.gpu.nodes > 1: the RayClusters (groups, multinode.py) written instead of a
    # Deployment; earlier revisions' groups still serving are in `keep`
    groups: tuple[str, ...] | None = None
    nodes: int = 1  # pods of one group (resources.gpu.nodes)

    @property
    def deployment(self) -> str:
        return self.stable.deployment

    @property
    def revision(self) -> str:
        return self.stable.revision

    @property
    def stable_target(self) -> int:
        """The stable Deployment's pods now (fewer than `replicas` while a canary has some)."""
        return self.stable.replicas

    @property
    def canary_deployment(self) -> str | None:
        return self.canary.deployment if self.canary else None

    @property
    def canary_revision(self) -> str | None:
        return self.canary.revision if self.canary else None

    @property
    def canary_replicas(self) -> int:
        return self.canary.replicas if self.canary else 0


def steady_layouts(ms: ModelService, images: RuntimeImages | str) -> tuple[VariantLayout, ...]:
    """Every variant in its own Deployment `<name>-<variant>`, running the spec."""
    split = replicas_by_variant(ms.spec.replicas, ms.spec.variants)
    revisions = variant_revisions(ms, images)
    return tuple(
        VariantLayout(v.name, v.weight, split[v.name],
                      Track(variant_child_name(ms.name, v.name), revisions[v.name], split[v.name]),
                      quantization=v.quantization)
        for v in ms.spec.variants
    )


def route_backends(ms_name: str, layouts: tuple[VariantLayout, ...], by_revision: bool) -> list[tuple[str, int]]:
    """(Service, weight) pairs for the HTTPRoute. Per variant Service, or, `by_revision` (a
    Canary strategy), per revision Service with each variant's weight split by the canary's
    share; weights are relative, so they are scaled by 100 to stay whole numbers."""
    if not by_revision:
        return [(variant_child_name(ms_name, layout.name), layout.weight) for layout in layouts]
    backends = []
    for layout in layouts:
        canary_share = layout.canary_weight if layout.canary else 0
        backends.append((revision_service_name(ms_name, layout.name, layout.stable.revision),
                         layout.weight * (100 - canary_share)))
        if layout.canary:
            backends.append((revision_service_name(ms_name, layout.name, layout.canary.revision),
                             layout.weight * canary_share))
    return backends
