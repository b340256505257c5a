"""spec.adapters rendered: the ConfigMap the pods follow, the fetch sidecar, the runtime's
env, and a pod template (and revision) that a change of the list leaves alone."""

from __future__ import annotations

import json

import pytest
from kubemaas_operator.builders import build_children
from kubemaas_operator.builders.revision import variant_revisions
from kubemaas_operator.policy import policy_problem
from kubemaas_operator.settings import OperatorSettings

from tests.unit.support import make_ms

SETTINGS = OperatorSettings()
GENERATIVE = {"uri": "hf://org/base@0123abc", "format": "transformers", "task": "text-generation",
              "secretRef": {"name": "hub"}}


def children(adapters):
    spec = {"model": GENERATIVE, **({"adapters": adapters} if adapters is not None else {})}
    return build_children(make_ms(spec), SETTINGS, runtime_image="registry/runtime:1")


def by_kind(objects, kind):
    return [o for o in objects if o["kind"] == kind]


def pod_of(objects):
    (deployment,) = by_kind(objects, "Deployment")
    return deployment["spec"]["template"]


def test_no_adapters_no_machinery():
    objects = children(None)
    assert not [o for o in by_kind(objects, "ConfigMap") if o["metadata"]["name"] == "m-adapters"]
    pod = pod_of(objects)["spec"]
    assert [c["name"] for c in pod["initContainers"]] == ["fetch-model"]
    env = {e["name"] for e in pod["containers"][0]["env"]}
    assert not env & {"KUBEMAAS_MAX_LORAS", "KUBEMAAS_ADAPTERS_CONFIG"}


def test_the_configmap_holds_the_list():
    adapters = [{"name": "sql", "uri": "hf://org/sql-lora@0123abc"},
                {"name": "local", "uri": "file:///adapters/local"}]
    (config_map,) = [o for o in by_kind(children(adapters), "ConfigMap")
                     if o["metadata"]["name"] == "m-adapters"]
    assert json.loads(config_map["data"]["adapters.json"]) == adapters
    assert config_map["metadata"]["ownerReferences"][0]["uid"] == "uid-1"


def test_pods_mount_the_configmap_as_a_directory_and_run_the_sidecar():
    pod = pod_of(children([{"name": "sql", "uri": "hf://org/sql-lora@0123abc"}]))["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["adapter-config"] == {"name": "adapter-config", "configMap": {"name": "m-adapters"}}
    assert "emptyDir" in volumes["adapters"]
    (container,) = pod["containers"]
    config_mount = next(m for m in container["volumeMounts"] if m["name"] == "adapter-config")
    assert "subPath" not in config_mount  # a subPath mount never sees the ConfigMap change
    sidecar = next(c for c in pod["initContainers"] if c["name"] == "fetch-adapters")
    assert sidecar["restartPolicy"] == "Always"
    # its own small requests, not spec.resources' a second time (a native sidecar's add up)
    assert sidecar["resources"] == {"requests": {"cpu": "100m", "memory": "512Mi"}, "limits": {"memory": "512Mi"}}
    assert sidecar["envFrom"] == [{"secretRef": {"name": "hub"}}]
    assert "envFrom" not in container
    assert any(m["name"] == "adapters" and "readOnly" not in m for m in sidecar["volumeMounts"])
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["KUBEMAAS_ADAPTERS_CONFIG"] == "/etc/kubemaas/adapters/adapters.json"


@pytest.mark.parametrize("after", [
    [],
    [{"name": "sql", "uri": "hf://org/sql-lora@0123abc"}, {"name": "chat", "uri": "s3://loras/chat"}],
])
def test_changing_the_list_keeps_the_pod_template_and_revision(after):
    before = [{"name": "sql", "uri": "hf://org/sql-lora@0123abc"}]
    assert pod_of(children(before)) == pod_of(children(after))
    revisions = [variant_revisions(make_ms({"model": GENERATIVE, "adapters": a}), "registry/runtime:1")
                 for a in (before, after)]
    assert revisions[0] == revisions[1]


def test_setting_the_field_is_a_new_pod_shape():
    assert pod_of(children(None)) != pod_of(children([]))
    revisions = [variant_revisions(make_ms({"model": GENERATIVE, **extra}), "registry/runtime:1")
                 for extra in ({}, {"adapters": []})]
    assert revisions[0] != revisions[1]


def test_unpinned_hub_adapter_is_refused():
    ms = make_ms({"model": GENERATIVE, "adapters": [{"name": "sql", "uri": "hf://org/sql-lora"}]})
    found = policy_problem(ms, SETTINGS, None)
    assert found is not None and found.reason == "UnpinnedModelRevision"
    assert "spec.adapters[0].uri" in found.message
    pinned = make_ms({"model": GENERATIVE, "adapters": [{"name": "sql", "uri": "hf://org/sql-lora@1"}]})
    assert policy_problem(pinned, SETTINGS, None) is None


def test_status_lists_the_adapters_the_pods_are_told():
    from kubemaas_operator.observe import Observation, compute_status
    from kubemaas_operator.reconcile import decide

    ms = make_ms({"model": GENERATIVE, "adapters": [{"name": "sql", "uri": "hf://org/sql-lora@1"},
                                                    {"name": "chat", "uri": "s3://loras/chat"}]})
    plan = decide(ms, SETTINGS, None)
    assert plan.adapters == ("sql", "chat")
    obs = Observation(name="m", namespace="ns", generation=1, selector=plan.selector, url=plan.url,
                      runtime_image=plan.runtime_image, variants=plan.variants, adapters=plan.adapters)
    assert compute_status(obs).to_wire()["adapters"] == ["sql", "chat"]
    assert decide(make_ms({"model": GENERATIVE}), SETTINGS, None).adapters is None
