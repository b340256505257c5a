"""A small, blocking Kubernetes client for the children the operator owns.

It talks JSON to the API server through the official client's ``ApiClient`` (auth, TLS,
retries from the kubeconfig or the in-cluster service account) without deserialising into
the generated models, which is the slow part of that client. Every write is server-side apply
under one field manager with ``force``. Handlers call it from kopf's thread pool (sync
handlers), never from the event loop.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException


@dataclass(frozen=True)
class Kind:
    api_version: str
    kind: str
    plural: str

    def path(self, namespace: str, name: str | None = None) -> str:
        prefix = "/api/v1" if self.api_version == "v1" else f"/apis/{self.api_version}"
        path = f"{prefix}/namespaces/{namespace}/{self.plural}"
        return f"{path}/{name}" if name else path


KINDS: dict[str, Kind] = {
    k.kind: k
    for k in (
        Kind("apps/v1", "Deployment", "deployments"),
        Kind("v1", "Service", "services"),
        Kind("policy/v1", "PodDisruptionBudget", "poddisruptionbudgets"),
        Kind("networking.k8s.io/v1", "NetworkPolicy", "networkpolicies"),
        Kind("autoscaling/v2", "HorizontalPodAutoscaler", "horizontalpodautoscalers"),
        Kind("keda.sh/v1alpha1", "ScaledObject", "scaledobjects"),
        Kind("gateway.networking.k8s.io/v1", "HTTPRoute", "httproutes"),
        Kind("kubemaas.io/v1alpha1", "ModelService", "modelservices"),
        Kind("apps/v1", "ReplicaSet", "replicasets"),
        Kind("v1", "Pod", "pods"),
    )
}

# Kinds a ModelService may own; stale ones among them are deleted after each apply.
OWNED_KINDS = ("Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler",
               "ScaledObject", "HTTPRoute", "NetworkPolicy")


class KindNotInstalled(Exception):
    """The API server does not serve this kind (its CRD is missing)."""

    def __init__(self, kind: Kind) -> None:
        super().__init__(f"{kind.kind}.{kind.api_version} is not served by this cluster")
        self.kind = kind


class NamespaceTerminating(Exception):
    """The namespace is being deleted: the API server refuses new objects in it (a 403 that
    is not a permission problem). Its ModelServices are going away with it."""


def load_api_client() -> client.ApiClient:
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.ApiClient()


class KubeClient:
    def __init__(self, api: client.ApiClient, field_manager: str) -> None:
        self._api = api
        self._field_manager = field_manager
        self._timeout = (5, 30)  # connect, read (seconds): a hung server must not pin a worker

    def _call(self, method: str, path: str, *, body: Any = None, query: list | None = None,
              content_type: str = "application/json") -> Any:
        method, url, headers, body, _ = self._api.param_serialize(
            method, path, query_params=query or [], body=body, auth_settings=["BearerToken"],
            header_params={"Content-Type": content_type, "Accept": "application/json"},
        )
        resp = self._api.call_api(method, url, header_params=headers, body=body,
                                  _request_timeout=self._timeout)
        data = resp.read()
        if not 200 <= resp.status < 300:
            raise ApiException(status=resp.status, reason=resp.reason,
                               body=data.decode("utf-8", "replace") if data else "")
        return json.loads(data) if data else None

    def apply(self, obj: dict) -> dict:
        """Server-side apply ``obj`` (force) and return the object the server holds."""
        kind = KINDS[obj["kind"]]
        meta = obj["metadata"]
        try:
            return self._call(
                "PATCH", kind.path(meta["namespace"], meta["name"]),
                body=json.dumps(obj),
                query=[("fieldManager", self._field_manager), ("force", "true")],
                content_type="application/apply-patch+yaml",
            )
        except ApiException as exc:
            if exc.status == 404 and _not_served(exc):
                raise KindNotInstalled(kind) from exc
            if exc.status == 403 and "NamespaceTerminating" in (exc.body or ""):
                raise NamespaceTerminating(meta["namespace"]) from exc
            raise

    def get(self, kind_name: str, namespace: str, name: str) -> dict | None:
        kind = KINDS[kind_name]
        try:
            return self._call("GET", kind.path(namespace, name))
        except ApiException as exc:
            if exc.status == 404:
                if _not_served(exc):
                    raise KindNotInstalled(kind) from exc
                return None
            raise

    def list(self, kind_name: str, namespace: str, label_selector: str) -> list[dict]:
        kind = KINDS[kind_name]
        try:
            out = self._call("GET", kind.path(namespace), query=[("labelSelector", label_selector)])
        except ApiException as exc:
            if exc.status == 404:
                return []  # kind not served: nothing of it can exist
            raise
        return out.get("items", [])

    def delete(self, kind_name: str, namespace: str, name: str, uid: str | None = None) -> None:
        """Delete, with a uid precondition when given so a same-named newcomer survives."""
        body: dict[str, Any] = {"propagationPolicy": "Background"}
        if uid:
            body["preconditions"] = {"uid": uid}
        try:
            self._call("DELETE", KINDS[kind_name].path(namespace, name), body=body)
        except ApiException as exc:
            if exc.status not in (404, 409):
                raise

    def scale_deployment(self, namespace: str, name: str, replicas: int) -> None:
        """Set only a Deployment's replicas (a merge patch, under our field manager), leaving its
        template alone. A Deployment already gone (deleted while a canary is promoted) is not
        an error."""
        try:
            self._call(
                "PATCH", KINDS["Deployment"].path(namespace, name),
                body={"spec": {"replicas": replicas}},  # the client encodes merge patches itself
                query=[("fieldManager", self._field_manager)],
                content_type="application/merge-patch+json",
            )
        except ApiException as exc:
            if exc.status != 404:
                raise

    def patch_status(self, namespace: str, name: str, status: dict) -> None:
        kind = KINDS["ModelService"]
        body = {"apiVersion": kind.api_version, "kind": kind.kind,
                "metadata": {"name": name, "namespace": namespace}, "status": status}
        self._call(
            "PATCH", kind.path(namespace, name) + "/status", body=json.dumps(body),
            query=[("fieldManager", self._field_manager), ("force", "true")],
            content_type="application/apply-patch+yaml",
        )


def _not_served(exc: ApiException) -> bool:
    """A 404 for a whole resource type has no Status details naming an object."""
    try:
        details = json.loads(exc.body or "{}").get("details") or {}
    except (ValueError, AttributeError):
        return True
    return "name" not in details
