"""The operator's lock-down, pure: which images, model sources and revisions a ModelService may
use; what of a termination message reaches status; the NetworkPolicy; the runtime's token."""

from __future__ import annotations

import pytest
from kubemaas_operator.builders.image import PinnedImages
from kubemaas_operator.builders.network_policy import admitted_namespaces
from kubemaas_operator.policy import image_repository, policy_problem
from kubemaas_operator.redact import MAX_MESSAGE_CHARS, safe_termination_line
from kubemaas_operator.settings import OperatorSettings

from tests.unit.support import make_ms

DEFAULT = OperatorSettings(runtime_image="registry.example/ml/kubemaas-runtime:1.0")


def ms_with(**spec) -> object:
    return make_ms(spec)


@pytest.mark.parametrize(("image", "reason"), [
    ("", None),  # the operator's default
    ("registry.example/ml/kubemaas-runtime:2.0", None),
    ("registry.example/ml/kubemaas-runtime@sha256:" + "a" * 64, None),
    ("registry.example/ml/kubemaas-runtime-evil:1.0", "ImageNotAllowed"),
    ("docker.io/attacker/runtime:1.0", "ImageNotAllowed"),
])
def test_images_default_to_the_runtime_repository(image, reason):
    result = policy_problem(ms_with(runtime={"image": image}), DEFAULT, None)
    assert (result.reason if result else None) == reason
    if result:
        assert image in result.message and "allowedRuntimeImages" in result.message


def test_an_explicit_allowlist_replaces_the_repository_default():
    settings = DEFAULT.model_copy(update={"allowed_runtime_images": ("mirror.corp/kubemaas/*",)})
    assert policy_problem(ms_with(runtime={"image": "mirror.corp/kubemaas/runtime:1"}), settings, None) is None
    assert policy_problem(ms_with(runtime={"image": "registry.example/ml/kubemaas-runtime:2.0"}), settings,
                   None).reason == "ImageNotAllowed"
    assert policy_problem(ms_with(), settings, None) is None  # the configured runtime image itself


def test_an_image_pinned_in_status_is_checked_too():
    assert policy_problem(ms_with(), DEFAULT, PinnedImages(builtin="docker.io/old/runtime:0.1")).reason == "ImageNotAllowed"


@pytest.mark.parametrize(("model", "reason"), [
    ({"uri": "pvc://models/net", "format": "torchscript"}, None),
    ({"uri": "s3://bucket/net.pt", "format": "exported-program"}, None),
    ({"uri": "hf://org/net@abc", "format": "torchscript"}, "UntrustedModelSource"),
    ({"uri": "hf://org/net@abc", "format": "transformers", "task": "feature-extraction"}, None),
    ({"uri": "hf://org/net", "format": "transformers", "task": "feature-extraction"}, "UnpinnedModelRevision"),
])
def test_code_formats_come_from_trusted_sources_and_hub_models_pin_a_revision(model, reason):
    result = policy_problem(ms_with(model=model), DEFAULT, None)
    assert (result.reason if result else None) == reason


def test_image_repository_keeps_a_registry_port():
    assert image_repository("registry:5000/org/runtime:1.0") == "registry:5000/org/runtime"
    assert image_repository("registry:5000/org/runtime@sha256:ab") == "registry:5000/org/runtime"
    assert image_repository("runtime") == "runtime"


@pytest.mark.parametrize(("message", "leaked"), [
    ("ModelFetchFailed: HF_TOKEN=hf_abcdefghijklmnopqrstuvwxyz1234 rejected", "hf_abc"),
    ("error: Authorization: Bearer abc.def.ghi", "abc.def"),
    ("AWS_SECRET_ACCESS_KEY='wJalrXUtnFEMI/K7MDENG' in env", "wJalr"),
    ("fetch: key AKIAIOSFODNN7EXAMPLE denied", "AKIAIOSFODNN7EXAMPLE"),
    ("password: hunter2", "hunter2"),
])
def test_termination_messages_never_echo_credentials(message, leaked):
    line = safe_termination_line(message)
    assert leaked not in line and "<redacted>" in line


def test_termination_messages_keep_the_reason_first_line_capped():
    assert safe_termination_line("\n  ModelLoadFailed: no config.json\nTraceback ...") == \
        "ModelLoadFailed: no config.json"
    assert len(safe_termination_line("ModelLoadFailed: " + "x" * 10_000)) == MAX_MESSAGE_CHARS


def test_network_policy_admits_own_gateway_listed_and_metrics_namespaces():
    ms = make_ms({"gateway": {"name": "public", "namespace": "gateways"},
                  "network": {"allowedNamespaces": ["clients", "ns"]}})
    assert admitted_namespaces(ms, DEFAULT) == sorted({"ns", "gateways", "clients", "monitoring"})
    assert admitted_namespaces(make_ms({}), DEFAULT) == ["monitoring", "ns"]


def test_node_cache_is_refused_while_the_operators_switch_is_off():
    cached = ms_with(model={"uri": "hf://org/m@abc123", "format": "transformers", "task": "feature-extraction",
                            "cache": "node"})
    off = policy_problem(cached, DEFAULT, None)
    assert off is not None and off.reason == "ModelCacheDisabled" and "spec.model.cache" in off.message
    assert policy_problem(cached, DEFAULT.model_copy(update={"model_cache": True}), None) is None
