"""kube.check_response: the one mapping from the API server's Status to the client's errors."""

from __future__ import annotations

import json

import pytest
from kubemaas_operator.kube import (
    KINDS,
    ApiError,
    Conflict,
    Invalid,
    KindNotInstalled,
    NamespaceTerminating,
    NotFound,
    check_response,
)

DEPLOYMENT = KINDS["Deployment"]


def _status(code: int, reason: str, details: dict | None = None, message: str = "refused") -> bytes:
    return json.dumps({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": code,
                       "reason": reason, "message": message, "details": details or {}}).encode()


def test_a_success_is_its_decoded_body() -> None:
    assert check_response(200, b'{"metadata": {"name": "m"}}', DEPLOYMENT) == {"metadata": {"name": "m"}}
    assert check_response(204, b"", DEPLOYMENT) is None


def test_a_missing_object_is_not_found_and_a_missing_kind_is_not_installed() -> None:
    with pytest.raises(NotFound):
        check_response(404, _status(404, "NotFound", {"name": "m-a", "kind": "deployments"}), DEPLOYMENT)
    with pytest.raises(KindNotInstalled) as exc:
        check_response(404, b"404 page not found\n", KINDS["ScaledObject"])
    assert exc.value.kind.kind == "ScaledObject"


def test_an_apply_conflict_is_a_conflict() -> None:
    body = _status(409, "Conflict", {"causes": [{"reason": "FieldManagerConflict", "field": ".spec.replicas",
                                                  "message": 'conflict with "kubectl-edit"'}]})
    with pytest.raises(Conflict) as exc:
        check_response(409, body, DEPLOYMENT)
    assert exc.value.status == 409 and exc.value.body["reason"] == "Conflict"


def test_a_terminating_namespace_is_told_apart_from_a_permission_denial() -> None:
    cause = {"reason": "NamespaceTerminating", "field": "metadata.namespace",
             "message": "namespace ns is being terminated"}
    with pytest.raises(NamespaceTerminating):
        check_response(403, _status(403, "Forbidden", {"name": "m-a", "causes": [cause]}), DEPLOYMENT)
    with pytest.raises(ApiError) as exc:
        check_response(403, _status(403, "Forbidden", {"name": "m-a"}, "cannot patch"), DEPLOYMENT)
    assert type(exc.value) is ApiError and "cannot patch" in str(exc.value)


def test_a_body_that_is_not_a_status_still_raises_with_the_code() -> None:
    with pytest.raises(ApiError) as exc:
        check_response(500, b"<html>bad gateway</html>", DEPLOYMENT)
    assert exc.value.status == 500 and "bad gateway" in str(exc.value)


def test_cluster_scoped_kinds_have_no_namespace_in_their_path():
    from kubemaas_operator.kube import KINDS

    assert KINDS["PersistentVolume"].path("ignored", "pv") == "/api/v1/persistentvolumes/pv"
    assert KINDS["PersistentVolumeClaim"].path("ns", "c") == "/api/v1/namespaces/ns/persistentvolumeclaims/c"


def test_a_json_patch_whose_test_failed_is_invalid() -> None:
    body = _status(422, "Invalid", {"name": "pv", "kind": "persistentvolumes"}, "the test operation failed")
    with pytest.raises(Invalid) as exc:
        check_response(422, body, KINDS["PersistentVolume"])
    assert exc.value.status == 422
