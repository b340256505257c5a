"""Every child a ModelService should have, in one pure function."""

from __future__ import annotations

from typing import Any

from kubemaas_operator.api import ModelService
from kubemaas_operator.builders.adapters import build_adapter_config_map, wants_adapters
from kubemaas_operator.builders.autoscaling import build_autoscaler
from kubemaas_operator.builders.deployment import build_variant_deployment
from kubemaas_operator.builders.disruption import build_disruption_budget, wants_disruption_budget
from kubemaas_operator.builders.gateway import build_http_route
from kubemaas_operator.builders.image import (
    RuntimeImages,
    choose_runtime_images,
    operator_images,
    pinned_images,
)
from kubemaas_operator.builders.inference_pool import build_routing_children, wants_inference_pool
from kubemaas_operator.builders.layout import VariantLayout, route_backends, steady_layouts
from kubemaas_operator.builders.model_cache import (
    build_cache_claim,
    build_cache_volume,
    uses_node_cache,
)
from kubemaas_operator.builders.network_policy import build_network_policy
from kubemaas_operator.builders.raycluster import build_ray_cluster
from kubemaas_operator.builders.revision import CANARY, STABLE
from kubemaas_operator.builders.services import (
    build_model_service,
    build_revision_service,
    build_variant_service,
)
from kubemaas_operator.engine import resolved_engine
from kubemaas_operator.settings import OperatorSettings


def build_children(
    ms: ModelService, settings: OperatorSettings, runtime_image: RuntimeImages | str | None = None,
    layouts: tuple[VariantLayout, ...] | None = None,
) -> list[dict[str, Any]]:
    """The desired children, in apply order: NetworkPolicy (so no pod runs unprotected), with
    spec.model.cache node the node-local cache's PersistentVolume and claim,
    Deployments, Services, PDB, autoscaler, HTTPRoute (with `spec.routing: inferencePool` the
    endpoint picker's children, the InferencePool, then the HTTPRoute to the pool), and last the
    RayClusters of a variant over several nodes (a layout with `groups`).

    Pure: a function of the spec, the settings, the runtime images (each variant runs its
    engine's flavour; one string: that image for all; default: the one policy of
    `builders.image`, with status as the pin) and the layout (default: the steady state, one
    Deployment per variant). `ms` must have a namespace; its uid becomes the
    owner reference (a placeholder when it has none yet). A Track that is not `apply` (a stable
    Deployment during a canary) is left out: the reconcile only scales it.
    """
    if isinstance(runtime_image, str):
        images = RuntimeImages.single(runtime_image)
    else:
        images = runtime_image or choose_runtime_images(ms, pinned_images(ms), operator_images(settings))
    layouts = layouts or steady_layouts(ms, images)
    variants = {v.name: v for v in ms.spec.variants}
    policy = build_network_policy(ms, settings)
    children: list[dict[str, Any]] = [policy] if policy is not None else []
    if wants_adapters(ms):  # before the pods that mount it
        children.append(build_adapter_config_map(ms))
    if uses_node_cache(ms):  # before the pods that mount the claim
        children.extend([build_cache_volume(ms, settings), build_cache_claim(ms, settings)])
    groups: list[dict[str, Any]] = []
    for layout in layouts:
        variant = variants[layout.name]
        image = images.for_engine(resolved_engine(ms, variant))
        if layout.groups is not None:
            groups.extend(build_ray_cluster(ms, variant, settings, image, name, layout.revision)
                          for name in layout.groups)
            continue
        if layout.stable.apply:
            children.append(build_variant_deployment(ms, variant, layout.stable, settings, image, STABLE))
        if layout.canary:
            children.append(build_variant_deployment(ms, variant, layout.canary, settings, image, CANARY))
    children.append(build_model_service(ms))
    children.extend(build_variant_service(ms, variant) for variant in ms.spec.variants)
    by_revision = ms.spec.gateway is not None and ms.spec.rollout.strategy == "Canary"
    if by_revision:
        for layout in layouts:
            tracks = [layout.stable, *([layout.canary] if layout.canary else [])]
            children.extend(build_revision_service(ms, layout.name, t.revision) for t in tracks)
    if wants_disruption_budget(ms):
        children.append(build_disruption_budget(ms))
    autoscaler = build_autoscaler(ms, settings)
    children.extend([autoscaler] if autoscaler is not None else [])
    if wants_inference_pool(ms):
        children.extend(build_routing_children(ms, settings))
    else:
        route = build_http_route(ms, route_backends(ms.name, layouts, by_revision))
        children.extend([route] if route is not None else [])
    # last: where KubeRay is not installed the apply stops there, with every other child written
    children.extend(groups)
    return children
