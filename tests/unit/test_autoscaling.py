"""Autoscaling on /scale: the HPA's metric per kind, KEDA's triggers (scale to zero and what
wakes a model from it), and the specs the API refuses. One case per behaviour."""

from __future__ import annotations

import math

import pytest
from kubemaas_operator.api import ModelService, describe_errors, rules
from kubemaas_operator.builders import build_children
from kubemaas_operator.builders.autoscaling import (
    ACTIVATION_SCALING_THRESHOLD,
    ACTIVATION_TRIGGER_NAME,
)
from kubemaas_operator.crd import build_crd
from kubemaas_operator.settings import OperatorSettings
from pydantic import ValidationError

from tests.unit.support import make_body, make_ms

SETTINGS = OperatorSettings()
SCALE_TARGET = {"apiVersion": "kubemaas.io/v1alpha1", "kind": "ModelService", "name": "m"}
GATEWAY = {"gateway": {"name": "public", "namespace": "gateways"}}
ENVOY_QUERY = ('sum(rate(envoy_cluster_upstream_rq_completed'
               '{envoy_cluster_name=~"httproute/ns/m/rule/.*"}[1m]))')
USER_QUERY = 'sum(rate(nginx_ingress_controller_requests{exported_service=~"m-.+"}[1m]))'


def autoscaler(autoscaling: dict, settings: OperatorSettings = SETTINGS, **spec) -> dict:
    ms = make_ms({"resources": {"cpu": "1"}, "autoscaling": autoscaling, **spec})
    (obj,) = [o for o in build_children(ms, settings, runtime_image="img")
              if o["kind"] in ("HorizontalPodAutoscaler", "ScaledObject")]
    return obj


def keda(**autoscaling) -> dict:
    return {"engine": "keda", "maxReplicas": 4, "target": 3, **autoscaling}


def refusals(spec: dict) -> list[str]:
    with pytest.raises(ValidationError) as info:
        ModelService.from_body(make_body(spec))
    return describe_errors(info.value)


# --- HPA ---------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("metric", "expected"),
    [
        ("cpu", {"type": "Resource",
                 "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 7}}}),
        ("concurrency", {"type": "Pods", "pods": {"metric": {"name": "kubemaas_inflight_requests"},
                                                  "target": {"type": "AverageValue", "averageValue": "7"}}}),
        ("rps", {"type": "Pods", "pods": {"metric": {"name": "kubemaas_requests_per_second"},
                                          "target": {"type": "AverageValue", "averageValue": "7"}}}),
    ],
)
def test_hpa_metric_per_kind(metric, expected):
    hpa = autoscaler({"minReplicas": 2, "maxReplicas": 6, "metric": metric, "target": 7})
    assert (hpa["apiVersion"], hpa["kind"]) == ("autoscaling/v2", "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == SCALE_TARGET
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 6)
    assert hpa["spec"]["metrics"] == [expected]


@pytest.mark.parametrize(
    ("seconds", "behavior"),
    [(None, None), (0, {"scaleDown": {"stabilizationWindowSeconds": 0}}),
     (120, {"scaleDown": {"stabilizationWindowSeconds": 120}})],
)
def test_hpa_scale_down_stabilization(seconds, behavior):
    scaling = {"maxReplicas": 3, "target": 8}
    if seconds is not None:
        scaling["scaleDownStabilizationSeconds"] = seconds
    assert autoscaler(scaling)["spec"].get("behavior") == behavior


# --- KEDA: the load trigger ------------------------------------------------------------------

@pytest.mark.parametrize(
    ("metric", "trigger"),
    [
        ("concurrency", {"type": "prometheus", "metricType": "AverageValue", "metadata": {
            "serverAddress": SETTINGS.prometheus_address,
            "query": 'sum(kubemaas_inflight_requests{namespace="ns",model="m"})', "threshold": "3"}}),
        ("rps", {"type": "prometheus", "metricType": "AverageValue", "metadata": {
            "serverAddress": SETTINGS.prometheus_address,
            "query": 'sum(rate(kubemaas_requests_total{namespace="ns",model="m"}[1m]))', "threshold": "3"}}),
        ("cpu", {"type": "cpu", "metricType": "Utilization", "metadata": {"value": "3"}}),
    ],
)
def test_keda_load_trigger_per_kind(metric, trigger):
    scaled = autoscaler(keda(minReplicas=1, metric=metric))
    assert (scaled["apiVersion"], scaled["kind"]) == ("keda.sh/v1alpha1", "ScaledObject")
    assert scaled["spec"]["scaleTargetRef"] == SCALE_TARGET
    assert (scaled["spec"]["minReplicaCount"], scaled["spec"]["maxReplicaCount"]) == (1, 4)
    assert scaled["spec"]["triggers"] == [trigger]  # above zero: no activation trigger


@pytest.mark.parametrize(
    ("autoscaling", "spec", "advanced", "cooldown"),
    [
        (keda(minReplicas=1), {}, None, None),
        (keda(minReplicas=1, scaleDownStabilizationSeconds=90), {},
         {"horizontalPodAutoscalerConfig": {"behavior": {"scaleDown": {"stabilizationWindowSeconds": 90}}}}, None),
        (keda(minReplicas=0), GATEWAY, None, None),  # KEDA's own default cooldown (300 s)
        (keda(minReplicas=0, scaleDownStabilizationSeconds=90), GATEWAY,
         {"horizontalPodAutoscalerConfig": {"behavior": {"scaleDown": {"stabilizationWindowSeconds": 90}}}}, 90),
    ],
    ids=["one", "one-stabilized", "zero", "zero-stabilized"],
)
def test_keda_scale_down_stabilization_and_cooldown(autoscaling, spec, advanced, cooldown):
    scaled = autoscaler(autoscaling, **spec)["spec"]
    assert scaled.get("advanced") == advanced
    assert scaled.get("cooldownPeriod") == cooldown


# --- KEDA: scale to zero and the activation trigger -------------------------------------------

@pytest.mark.parametrize(
    ("autoscaling", "spec", "query"),
    [
        (keda(minReplicas=0), GATEWAY, ENVOY_QUERY),
        (keda(minReplicas=0, activationQuery=USER_QUERY), {}, USER_QUERY),
        (keda(minReplicas=0, activationQuery=USER_QUERY), GATEWAY, USER_QUERY),  # the spec's query wins
        (keda(minReplicas=0, metric="rps"), GATEWAY, ENVOY_QUERY),
    ],
    ids=["gateway", "activation-query", "both", "rps-gateway"],
)
def test_scale_to_zero_adds_an_activation_trigger(autoscaling, spec, query):
    scaled = autoscaler(autoscaling, **spec)["spec"]
    assert scaled["minReplicaCount"] == 0
    load, activation = scaled["triggers"]
    assert load["type"] == "prometheus" and "name" not in load
    assert activation == {
        "type": "prometheus", "name": ACTIVATION_TRIGGER_NAME, "metricType": "AverageValue",
        "metadata": {"serverAddress": SETTINGS.prometheus_address, "query": query,
                     "threshold": ACTIVATION_SCALING_THRESHOLD, "activationThreshold": "0"}}


@pytest.mark.parametrize("demand", [0.01, 1, 5_000, 10_000_000])
def test_the_activation_trigger_never_asks_for_more_than_one_replica(demand):
    # The HPA KEDA creates wants ceil(value / threshold) replicas for an AverageValue trigger and
    # follows the trigger asking for most; the load trigger asks for at least one pod once awake.
    assert math.ceil(demand / float(ACTIVATION_SCALING_THRESHOLD)) <= 1


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        (('sum(rate(istio_requests_total{reporter="source",destination_service_namespace="{namespace}",'
          'destination_service_name=~"{name}-.+"}[1m]))'),
         ('sum(rate(istio_requests_total{reporter="source",destination_service_namespace="ns",'
          'destination_service_name=~"m-.+"}[1m]))')),
        ('sum(rate(gw_requests_total{route="{namespace}/{route}"}[2m]))',
         'sum(rate(gw_requests_total{route="ns/m"}[2m]))'),
    ],
    ids=["istio", "route"],
)
def test_gateway_request_query_is_the_setting_filled_in(template, expected):
    settings = OperatorSettings.from_env({"KUBEMAAS_OPERATOR_GATEWAY_REQUEST_QUERY": template})
    (_, activation) = autoscaler(keda(minReplicas=0), settings, **GATEWAY)["spec"]["triggers"]
    assert activation["metadata"]["query"] == expected


@pytest.mark.parametrize("template", ["sum(rate(envoy_cluster_upstream_rq_completed[1m]))",
                                      'sum(rate(x{namespace="{namespace}"}[1m]))',
                                      'sum(rate(x{route="{route}"}[1m]))'])
def test_a_gateway_query_that_names_no_model_is_refused(template):
    with pytest.raises(ValidationError, match="gateway_request_query"):
        OperatorSettings(gateway_request_query=template)


# --- what the API refuses (the same rules are CEL in the CRD; fixtures in tests/fixtures) --------

@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ({"autoscaling": {"engine": "hpa", "minReplicas": 0, "maxReplicas": 2, "target": 1}, **GATEWAY},
         "spec.autoscaling.minReplicas: autoscaling.minReplicas 0 (scale to zero) needs autoscaling.engine keda"),
        ({"resources": {"cpu": "1"}, "autoscaling": keda(minReplicas=0, metric="cpu"), **GATEWAY},
         "spec.autoscaling.minReplicas: autoscaling.minReplicas 0 (scale to zero) needs a request metric"),
        ({"autoscaling": keda(minReplicas=0)},
         "spec.autoscaling.minReplicas: autoscaling.minReplicas 0 (scale to zero) needs a demand signal"),
        ({"autoscaling": keda(minReplicas=1, activationQuery=USER_QUERY)},
         "spec.autoscaling.activationQuery: autoscaling.activationQuery applies only to scale to zero"),
        ({"autoscaling": {"maxReplicas": 2, "target": 1, "activationQuery": USER_QUERY}},
         "spec.autoscaling.activationQuery: autoscaling.activationQuery applies only to scale to zero"),
        ({"autoscaling": keda(minReplicas=0, activationQuery="x" * 1025)},
         "spec.autoscaling.activationQuery: String should have at most 1024 characters"),
        ({"autoscaling": keda(minReplicas=0, activationQuery="")},
         "spec.autoscaling.activationQuery: String should have at least 1 character"),
    ],
    ids=["hpa", "cpu", "no-demand-signal", "activation-at-one", "activation-with-hpa", "query-too-long",
         "query-empty"],
)
def test_refused(spec, expected):
    assert any(line.startswith(expected) for line in refusals(spec)), refusals(spec)


@pytest.mark.parametrize(
    "spec",
    [{"autoscaling": keda(minReplicas=0), **GATEWAY},
     {"autoscaling": keda(minReplicas=0, metric="rps", activationQuery=USER_QUERY)},
     {"autoscaling": keda(minReplicas=1), **GATEWAY}],
    ids=["zero-gateway", "zero-activation-query", "keda-one"],
)
def test_accepted(spec):
    assert make_ms(spec).spec.autoscaling is not None


def test_the_api_server_gets_the_same_rules():
    spec = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    scaling = spec["properties"]["autoscaling"]
    assert rules.SCALE_TO_ZERO_NEEDS_DEMAND_SIGNAL.to_schema() in spec["x-kubernetes-validations"]
    assert rules.ACTIVATION_QUERY_ONLY_AT_ZERO.to_schema() in scaling["x-kubernetes-validations"]
    assert scaling["properties"]["activationQuery"]["maxLength"] == 1024
