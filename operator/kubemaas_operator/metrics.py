"""The operator's own Prometheus metrics (served on the settings' metrics port)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

RECONCILES = Counter("kubemaas_operator_reconciles_total",
                     "ModelService reconciles by result (applied, blocked, invalid, error).",
                     ["result"])
RECONCILE_SECONDS = Histogram("kubemaas_operator_reconcile_duration_seconds",
                              "Time to apply one ModelService's children (in the thread pool, not counting the wait for a thread).",
                              buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
MANAGED = Gauge("kubemaas_operator_managed_modelservices",
                "ModelServices this operator process has reconciled and keeps converged.")


def record_reconcile(result: str, seconds: float) -> None:
    RECONCILES.labels(result).inc()
    RECONCILE_SECONDS.observe(seconds)


def serve(port: int) -> None:
    if port:
        start_http_server(port, addr="0.0.0.0")
