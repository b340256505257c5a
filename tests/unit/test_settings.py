"""OperatorSettings: defaults, and the environment read once."""

from __future__ import annotations

import pytest
from kubemaas_operator.settings import OperatorSettings
from pydantic import ValidationError


def test_defaults():
    s = OperatorSettings()
    assert s.gpu_resource_name == "nvidia.com/gpu" and s.cluster_domain == "cluster.local"
    assert s.namespaces == () and s.field_manager == "kubemaas-operator" and s.log_format == "text"


def test_from_env_reads_prefixed_variables_only():
    s = OperatorSettings.from_env({
        "KUBEMAAS_OPERATOR_RUNTIME_IMAGE": "r:2",
        "KUBEMAAS_OPERATOR_NAMESPACES": "a, b,,",
        "KUBEMAAS_OPERATOR_LOG_FORMAT": "json",
        "KUBEMAAS_OPERATOR_DRAIN_SECONDS": "12",
        "KUBEMAAS_OPERATOR_CLUSTER_DOMAIN": "",
        "KUBEMAAS_MAX_BATCH_SIZE": "3",
    })
    assert (s.runtime_image, s.namespaces, s.log_format, s.drain_seconds) == ("r:2", ("a", "b"), "json", 12)
    assert s.cluster_domain == "cluster.local"


def test_bad_values_are_refused():
    with pytest.raises(ValidationError):
        OperatorSettings.from_env({"KUBEMAAS_OPERATOR_LOG_FORMAT": "xml"})
