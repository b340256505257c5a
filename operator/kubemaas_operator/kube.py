"""A small, blocking Kubernetes client for the children the operator owns.

It talks JSON to the API server through the official client's ``ApiClient`` (auth, TLS,
retries from the kubeconfig or the in-cluster service account) without deserialising into
the generated models, which is the slow part of that client. Writes are server-side apply under
one field manager. Every response goes through one mapping, :func:`check_response` (the model
is kopf's own), from the API server's ``Status`` to the errors below. It blocks: the operator
calls it from a thread pool, never from the event loop.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kubernetes import client, config


@dataclass(frozen=True)
class Kind:
    api_version: str
    kind: str
    plural: str
    namespaced: bool = True

    def path(self, namespace: str, name: str | None = None) -> str:
        prefix = "/api/v1" if self.api_version == "v1" else f"/apis/{self.api_version}"
        path = f"{prefix}/namespaces/{namespace}/{self.plural}" if self.namespaced else f"{prefix}/{self.plural}"
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
        Kind("inference.networking.k8s.io/v1", "InferencePool", "inferencepools"),
        # read only: the endpoint picker (v1.2.0) watches it and does not start without its CRD
        Kind("inference.networking.x-k8s.io/v1alpha2", "InferenceObjective", "inferenceobjectives"),
        Kind("v1", "ConfigMap", "configmaps"),
        Kind("v1", "ServiceAccount", "serviceaccounts"),
        Kind("rbac.authorization.k8s.io/v1", "Role", "roles"),
        Kind("rbac.authorization.k8s.io/v1", "RoleBinding", "rolebindings"),
        Kind("kubemaas.io/v1alpha1", "ModelService", "modelservices"),
        Kind("apps/v1", "ReplicaSet", "replicasets"),
        Kind("v1", "Pod", "pods"),
        Kind("ray.io/v1", "RayCluster", "rayclusters"),
        # spec.model.cache node (builders/model_cache.py): the local PV is cluster-scoped
        Kind("v1", "PersistentVolumeClaim", "persistentvolumeclaims"),
        Kind("v1", "PersistentVolume", "persistentvolumes", namespaced=False),
        Kind("batch/v1", "Job", "jobs"),  # the cache's eviction Jobs (builders/cache_eviction.py)
        Kind("v1", "Node", "nodes", namespaced=False),  # read only: the cache's node group (its sweep)
    )
}

# Events are only ever created (the chart grants nothing else on them), so they stay out of KINDS.
EVENT = Kind("v1", "Event", "events")

# Kinds a ModelService may own; stale ones among them are deleted after each apply.
OWNED_KINDS = ("Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler",
               "ScaledObject", "HTTPRoute", "NetworkPolicy", "ConfigMap")  # spec.adapters' (and the picker's)
# spec.routing: inferencePool's children besides a Deployment, a Service, a ConfigMap and the
# HTTPRoute (the endpoint picker's); listed for pruning only when the operator's routing switch
# (endpoint_picker_image) is on: off, its RBAC need not grant them.
ROUTING_KINDS = ("InferencePool", "ServiceAccount", "Role", "RoleBinding")


class ApiError(Exception):
    """A request the API server refused, with its ``Status`` (``reason``, ``details``)."""

    def __init__(self, status: int, message: str, body: dict | None = None) -> None:
        super().__init__(f"({status}) {message}")
        self.status = status
        self.body = body or {}


class NotFound(ApiError):
    """404 for one object: the kind is served, the object (or its namespace) is not there."""


class Conflict(ApiError):
    """409: a server-side apply that would change fields another manager owns (without
    ``force``), an object that already exists, or a failed precondition."""


class KindNotInstalled(ApiError):
    """The API server does not serve this kind (its CRD is missing): a 404 for the whole type."""

    def __init__(self, kind: Kind, status: int = 404, body: dict | None = None) -> None:
        super().__init__(status, f"{kind.kind}.{kind.api_version} is not served by this cluster", body)
        self.kind = kind


class Invalid(ApiError):
    """422: a request the server cannot apply, such as a JSON patch whose `test` failed."""


class NamespaceTerminating(ApiError):
    """The namespace is being deleted: the API server refuses new objects in it (a 403 that
    is not a permission problem). Its ModelServices are going away with it."""


def check_response(status: int, data: bytes, kind: Kind) -> Any:
    """The decoded body of a 2xx response; otherwise the error its ``Status`` names."""
    if 200 <= status < 300:
        return json.loads(data) if data else None
    text = data.decode("utf-8", "replace") if data else ""
    try:
        body = json.loads(text) if text else {}
    except ValueError:
        body = {}
    if not isinstance(body, dict):
        body = {}
    details = body.get("details") or {}
    causes = {c.get("reason") for c in details.get("causes") or []}
    message = body.get("message") or text or f"HTTP {status}"
    if status == 404:
        # a missing object's Status names it; a kind that is not served answers without one
        raise NotFound(status, message, body) if "name" in details else KindNotInstalled(kind, status, body)
    if status == 409:
        raise Conflict(status, message, body)
    if status == 422:
        raise Invalid(status, message, body)
    if status == 403 and "NamespaceTerminating" in causes:
        raise NamespaceTerminating(status, message, body)
    raise ApiError(status, message, body)


def load_api_client(pool_size: int) -> client.ApiClient:
    """A client for the cluster the operator runs in (or the kubeconfig's), with one pooled
    connection per worker thread: the default pool (5 per CPU) would drop and reopen them."""
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    configuration = client.Configuration.get_default_copy()
    configuration.connection_pool_maxsize = pool_size
    return client.ApiClient(configuration)


class KubeClient:
    def __init__(self, api: client.ApiClient, field_manager: str) -> None:
        self._api = api
        self._field_manager = field_manager
        self._timeout = (5, 30)  # connect, read (seconds): a hung server must not pin a worker

    def _call(self, method: str, kind: Kind, path: str, *, body: Any = None, query: list | None = None,
              content_type: str = "application/json") -> Any:
        method, url, headers, body, _ = self._api.param_serialize(
            method, path, query_params=query or [], body=body, auth_settings=["BearerToken"],
            header_params={"Content-Type": content_type, "Accept": "application/json"},
        )
        resp = self._api.call_api(method, url, header_params=headers, body=body,
                                  _request_timeout=self._timeout)
        return check_response(resp.status, resp.read(), kind)

    def apply(self, obj: dict, force: bool = False) -> dict:
        """Server-side apply ``obj`` and return the object the server holds. Without ``force``
        a field another manager changed (a hand edit, or an object that is not ours) is a
        :class:`Conflict`."""
        kind = KINDS[obj["kind"]]
        meta = obj["metadata"]
        query = [("fieldManager", self._field_manager)] + ([("force", "true")] if force else [])
        return self._call("PATCH", kind, kind.path(meta.get("namespace", ""), meta["name"]), body=json.dumps(obj),
                          query=query, content_type="application/apply-patch+yaml")

    def get(self, kind_name: str, namespace: str, name: str) -> dict | None:
        kind = KINDS[kind_name]
        try:
            return self._call("GET", kind, kind.path(namespace, name))
        except NotFound:
            return None

    def list(self, kind_name: str, namespace: str, label_selector: str) -> list[dict]:
        kind = KINDS[kind_name]
        try:
            out = self._call("GET", kind, kind.path(namespace), query=[("labelSelector", label_selector)])
        except (KindNotInstalled, NotFound):
            return []  # kind not served (or namespace gone): nothing of it can exist
        return out.get("items", [])

    def served(self, kind_name: str, namespace: str) -> bool:
        """Whether the API server serves this kind (its CRD is installed): a LIST of at most one."""
        kind = KINDS[kind_name]
        try:
            self._call("GET", kind, kind.path(namespace), query=[("limit", "1")])
        except KindNotInstalled:
            return False
        except NotFound:
            return True  # the kind is served; the namespace is gone
        return True

    def delete(self, kind_name: str, namespace: str, name: str, uid: str | None = None) -> None:
        """Delete, with a uid precondition when given so a same-named newcomer survives."""
        kind = KINDS[kind_name]
        body: dict[str, Any] = {"propagationPolicy": "Background"}
        if uid:
            body["preconditions"] = {"uid": uid}
        try:
            self._call("DELETE", kind, kind.path(namespace, name), body=body)
        except (NotFound, Conflict):
            pass  # gone already, or a newcomer of the same name

    def scale_deployment(self, namespace: str, name: str, replicas: int) -> None:
        """Set only a Deployment's replicas (a merge patch, under our field manager), leaving its
        template alone. A Deployment already gone (deleted while a canary is promoted) is not
        an error."""
        kind = KINDS["Deployment"]
        try:
            self._call(
                "PATCH", kind, kind.path(namespace, name),
                body={"spec": {"replicas": replicas}},  # the client encodes merge patches itself
                query=[("fieldManager", self._field_manager)],
                content_type="application/merge-patch+json",
            )
        except NotFound:
            pass

    def json_patch(self, kind_name: str, namespace: str, name: str, ops: Sequence[dict[str, Any]]) -> bool:
        """Apply a JSON patch (RFC 6902); False when the object is gone or a `test` failed (it
        changed since it was read)."""
        kind = KINDS[kind_name]
        try:
            # a list: the client JSON-encodes it and keeps the json-patch content type
            self._call("PATCH", kind, kind.path(namespace, name), body=[*ops],
                       query=[("fieldManager", self._field_manager)], content_type="application/json-patch+json")
        except (NotFound, Invalid):
            return False
        return True

    def patch_status(self, namespace: str, name: str, status: dict) -> None:
        kind = KINDS["ModelService"]
        body = {"apiVersion": kind.api_version, "kind": kind.kind,
                "metadata": {"name": name, "namespace": namespace}, "status": status}
        self._call(
            "PATCH", kind, kind.path(namespace, name) + "/status", body=json.dumps(body),
            query=[("fieldManager", self._field_manager), ("force", "true")],
            content_type="application/apply-patch+yaml",
        )

    def create_event(self, event: dict) -> None:
        # a dict: the client JSON-encodes application/json bodies itself
        self._call("POST", EVENT, EVENT.path(event["metadata"]["namespace"]), body=event)
