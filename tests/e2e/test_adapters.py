"""spec.adapters on the real control plane: adding and removing an adapter reaches the pods'
ConfigMap (and status) while the pod template, its hash and the pods stay as they were."""

from __future__ import annotations

import json

from tests.e2e import msvc
from tests.e2e.cluster import Cluster

GENERATIVE = {"uri": "file:///opt/kubemaas/models/tiny-llm", "format": "transformers",
              "task": "text-generation"}
SQL = {"name": "sql", "uri": "hf://org/sql-lora@0123abc"}
CHAT = {"name": "chat", "uri": "s3://loras/chat"}


def adapter_list(cluster: Cluster, namespace: str, name: str) -> list[dict] | None:
    found = cluster.kubectl("get", "configmap", f"{name}-adapters", "-n", namespace,
                            "-o", "json", check=False)
    if found.returncode != 0:
        return None
    return json.loads(json.loads(found.stdout)["data"]["adapters.json"])


def pods(cluster: Cluster, namespace: str, name: str) -> dict[str, str]:
    items = cluster.get_json("pods", "-n", namespace, "-l", f"kubemaas.io/modelservice={name}")["items"]
    return {p["metadata"]["name"]: p["metadata"]["labels"]["pod-template-hash"] for p in items}


def test_adding_and_removing_an_adapter_keeps_the_pods(cluster: Cluster, operator, namespace: str) -> None:
    base = msvc.modelservice("lora")
    base["spec"]["model"] = GENERATIVE
    base["spec"]["adapters"] = [SQL]
    msvc.apply(cluster, namespace, base)
    first = msvc.wait_ready(cluster, namespace, "lora")
    assert first["status"]["adapters"] == ["sql"]
    assert adapter_list(cluster, namespace, "lora") == [SQL]
    (deployment,) = msvc.deployments(cluster, namespace, "lora").values()
    template, generation = deployment["spec"]["template"], deployment["metadata"]["generation"]
    replicasets = msvc.replicasets(cluster, namespace, "lora")
    running = pods(cluster, namespace, "lora")
    assert running and len(set(running.values())) == 1

    for adapters in ([SQL, CHAT], [CHAT]):
        msvc.apply(cluster, namespace, msvc.with_changes(base, adapters=adapters))
        cluster.wait_until(lambda a=adapters: adapter_list(cluster, namespace, "lora") == a,
                           timeout=60, what=f"the ConfigMap lists {[x['name'] for x in adapters]}")
        ms = msvc.wait_ready(cluster, namespace, "lora")
        assert ms["status"]["adapters"] == [a["name"] for a in adapters]
        (deployment,) = msvc.deployments(cluster, namespace, "lora").values()
        assert deployment["spec"]["template"] == template
        assert deployment["metadata"]["generation"] == generation
        assert msvc.replicasets(cluster, namespace, "lora") == replicasets
        assert pods(cluster, namespace, "lora") == running

    # spec.adapters dropped: the pods lose the machinery (a new template) and the ConfigMap goes
    without = json.loads(json.dumps(base))
    del without["spec"]["adapters"]
    msvc.apply(cluster, namespace, without)
    cluster.wait_until(lambda: adapter_list(cluster, namespace, "lora") is None, timeout=60,
                       what="the adapters ConfigMap pruned")
    assert "adapters" not in (msvc.wait_ready(cluster, namespace, "lora")["status"].get("adapters") or [])
