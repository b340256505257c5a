"""HPA (engine hpa) or KEDA ScaledObject (engine keda), both on the ModelService's /scale.

They scale `spec.replicas` (the total); the operator splits it over the variants. The request
metrics come from the runtime's series (labels `model`, `variant`, plus the `namespace` and
`pod` Prometheus adds when scraping):

- concurrency: `kubemaas_inflight_requests` (a gauge), averaged per pod;
- rps: the per-second rate of `kubemaas_requests_total`, per pod. For the HPA it is the custom
  metric `kubemaas_requests_per_second`, which a prometheus-adapter rule provides (docs/api.md);
- for text-generation, running-sequences, waiting-sequences and kv-cache-usage: the gauges
  `kubemaas_num_requests_running`, `kubemaas_num_requests_waiting` and
  `kubemaas_kv_cache_usage_ratio` (0..1; the spec's target is a percent of it), per pod.

Scale to zero (KEDA, minReplicas 0) needs a second, activation trigger on a demand signal that
exists while no pod runs: `autoscaling.activationQuery`, else the Gateway's request rate for the
model's HTTPRoute (the operator setting `gateway_request_query`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kubemaas_operator.api import API_VERSION, KIND, Autoscaling, ModelService
from kubemaas_operator.builders.naming import child_metadata, common_labels
from kubemaas_operator.settings import OperatorSettings


@dataclass(frozen=True)
class RequestMetric:
    """A per-pod request metric: its custom-metrics API name and the runtime series behind it."""

    hpa_metric: str
    runtime_series: str
    promql: str  # the KEDA prometheus trigger's query, {selector} filled per ModelService
    percent: bool = False  # the series is a ratio (0..1) and the spec's target a percent of it

    def target(self, target: int) -> str:
        """The per-pod target as the HPA (a quantity) and KEDA (a number) both read it."""
        if not self.percent:
            return str(target)
        return f"{target * 10}m"  # 80 (%) -> 800m = 0.8


def _gauge(series: str, percent: bool = False) -> RequestMetric:
    return RequestMetric(hpa_metric=series, runtime_series=series,
                         promql=f"sum({series}{{{{{{selector}}}}}})", percent=percent)


REQUEST_METRICS: dict[str, RequestMetric] = {
    "concurrency": RequestMetric(
        hpa_metric="kubemaas_inflight_requests",
        runtime_series="kubemaas_inflight_requests",
        promql="sum(kubemaas_inflight_requests{{{selector}}})",
    ),
    "rps": RequestMetric(
        hpa_metric="kubemaas_requests_per_second",
        runtime_series="kubemaas_requests_total",
        promql="sum(rate(kubemaas_requests_total{{{selector}}}[1m]))",
    ),
    "running-sequences": _gauge("kubemaas_num_requests_running"),
    "waiting-sequences": _gauge("kubemaas_num_requests_waiting"),
    "kv-cache-usage": _gauge("kubemaas_kv_cache_usage_ratio", percent=True),
}


def _scale_target(ms: ModelService) -> dict[str, str]:
    return {"apiVersion": API_VERSION, "kind": KIND, "name": ms.name}


def _hpa_metric(scaling: Autoscaling) -> dict[str, Any]:
    if scaling.metric == "cpu":
        return {
            "type": "Resource",
            "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": scaling.target}},
        }
    metric = REQUEST_METRICS[scaling.metric]
    return {
        "type": "Pods",
        "pods": {
            "metric": {"name": metric.hpa_metric},
            "target": {"type": "AverageValue", "averageValue": metric.target(scaling.target)},
        },
    }


def _scale_down_behavior(scaling: Autoscaling) -> dict[str, Any] | None:
    if scaling.scale_down_stabilization_seconds is None:
        return None
    return {"scaleDown": {"stabilizationWindowSeconds": scaling.scale_down_stabilization_seconds}}


def build_hpa(ms: ModelService, scaling: Autoscaling) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "scaleTargetRef": _scale_target(ms),
        "minReplicas": scaling.min_replicas,
        "maxReplicas": scaling.max_replicas,
        "metrics": [_hpa_metric(scaling)],
    }
    behavior = _scale_down_behavior(scaling)
    if behavior:
        spec["behavior"] = behavior
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": child_metadata(ms, ms.name, common_labels(ms.name, "autoscaler")),
        "spec": spec,
    }


def keda_query(ms: ModelService, metric: str) -> str:
    """The PromQL a KEDA prometheus trigger runs: the total over all the model's pods."""
    selector = f'namespace="{ms.namespace}",model="{ms.name}"'
    return REQUEST_METRICS[metric].promql.format(selector=selector)


def _keda_trigger(ms: ModelService, scaling: Autoscaling, settings: OperatorSettings) -> dict[str, Any]:
    if scaling.metric == "cpu":
        # Utilization of the pods' CPU request, as the HPA's. KEDA cannot take a cpu trigger to
        # zero (there is no pod to measure), hence the API's rule against minReplicas 0 with it.
        return {"type": "cpu", "metricType": "Utilization", "metadata": {"value": str(scaling.target)}}
    return {
        "type": "prometheus",
        # AverageValue (KEDA's default, spelled out): the HPA divides the query's total by the
        # threshold, so the threshold is the per-pod target. `Value` would compare the total.
        "metricType": "AverageValue",
        "metadata": {
            "serverAddress": settings.prometheus_address,
            "query": keda_query(ms, scaling.metric),
            "threshold": _keda_number(REQUEST_METRICS[scaling.metric].target(scaling.target)),
        },
    }


def _keda_number(quantity: str) -> str:
    """KEDA's threshold is a plain number: 800m -> 0.8."""
    if quantity.endswith("m"):
        return f"{int(quantity[:-1]) / 1000:g}"
    return quantity


ACTIVATION_TRIGGER_NAME = "activation"
# KEDA hands every trigger to the HPA it creates, and the HPA follows whichever asks for the
# most replicas: ceil(value / threshold) for this one. A threshold no request rate reaches keeps
# that at most 1 (the HPA's floor while KEDA holds the model awake anyway), so above one pod the
# load trigger alone decides; this trigger only wakes the model (activationThreshold).
ACTIVATION_SCALING_THRESHOLD = "1000000000"


def gateway_request_query(ms: ModelService, settings: OperatorSettings) -> str:
    """The setting's query for this model: its namespace, name and HTTPRoute (named after it)."""
    query = settings.gateway_request_query
    for placeholder, value in (("{namespace}", ms.namespace), ("{name}", ms.name), ("{route}", ms.name)):
        query = query.replace(placeholder, value)
    return query


def activation_query(ms: ModelService, scaling: Autoscaling, settings: OperatorSettings) -> str | None:
    """What wakes a model at zero replicas: activationQuery, else the Gateway's request rate."""
    if not scaling.scales_to_zero:
        return None
    if scaling.activation_query is not None:
        return scaling.activation_query
    if ms.spec.gateway is not None:
        return gateway_request_query(ms, settings)
    return None  # the API refuses minReplicas 0 without either


def _activation_trigger(query: str, settings: OperatorSettings) -> dict[str, Any]:
    return {
        "type": "prometheus",
        "name": ACTIVATION_TRIGGER_NAME,
        "metricType": "AverageValue",
        "metadata": {
            "serverAddress": settings.prometheus_address,
            "query": query,
            "threshold": ACTIVATION_SCALING_THRESHOLD,
            # Active above 0: any demand at all starts the first pod.
            "activationThreshold": "0",
        },
    }


def build_scaled_object(ms: ModelService, scaling: Autoscaling, settings: OperatorSettings) -> dict[str, Any]:
    triggers = [_keda_trigger(ms, scaling, settings)]
    wake = activation_query(ms, scaling, settings)
    if wake is not None:
        triggers.append(_activation_trigger(wake, settings))
    spec: dict[str, Any] = {
        "scaleTargetRef": _scale_target(ms),
        "minReplicaCount": scaling.min_replicas,
        "maxReplicaCount": scaling.max_replicas,
        "triggers": triggers,
    }
    behavior = _scale_down_behavior(scaling)
    if behavior:
        spec["advanced"] = {"horizontalPodAutoscalerConfig": {"behavior": behavior}}
        if scaling.scales_to_zero:
            # The HPA never goes below one pod; KEDA stops the last one after cooldownPeriod idle.
            spec["cooldownPeriod"] = scaling.scale_down_stabilization_seconds
    return {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": child_metadata(ms, ms.name, common_labels(ms.name, "autoscaler")),
        "spec": spec,
    }


def build_autoscaler(ms: ModelService, settings: OperatorSettings) -> dict[str, Any] | None:
    scaling = ms.spec.autoscaling
    if scaling is None:
        return None
    if scaling.engine == "keda":
        return build_scaled_object(ms, scaling, settings)
    return build_hpa(ms, scaling)
