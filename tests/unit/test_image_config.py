"""hack/images writes each image's config (entrypoint, command, user, environment, ports) with
umoci; here it is compared with the final stage of the image's Dockerfile, without building
anything. The real-pod tier compares the built archives too."""

from __future__ import annotations

import pytest

from tests.e2e.realpods.images import REPO, dockerfile_final_stage, images_cli


def umoci_config(side: str) -> dict:
    lines = images_cli("config", side).splitlines()
    config: dict = {"Entrypoint": [], "Cmd": [], "Env": {}, "ExposedPorts": []}
    for flag, value in zip(lines[::2], lines[1::2], strict=True):
        key = flag.removeprefix("--config.")
        if key == "env":
            name, _, val = value.partition("=")
            config["Env"][name] = val
        elif key == "entrypoint":
            config["Entrypoint"].append(value)
        elif key == "cmd":
            config["Cmd"].append(value)
        elif key == "exposedports":
            config["ExposedPorts"].append(value)
        elif key == "user":
            config["User"] = value
        else:
            raise AssertionError(f"unexpected umoci flag {flag}")
    return config


@pytest.mark.parametrize("side", ["runtime", "operator"])
def test_hack_images_writes_the_dockerfiles_config(side: str):
    config = umoci_config(side)
    docker = dockerfile_final_stage(REPO / side / "Dockerfile")
    assert config["Entrypoint"] == docker["entrypoint"]
    assert config["Cmd"] == docker["cmd"]
    assert config["User"] == docker["user"]
    assert sorted(config["ExposedPorts"]) == sorted(docker["ports"])
    for key, value in docker["env"].items():
        if "$PATH" in value:  # PATH=/opt/kubemaas/bin:$PATH: the venv first
            assert config["Env"][key].startswith(value.replace("$PATH", "")), key
        else:
            assert config["Env"].get(key) == value, key


def test_the_runtime_image_runs_as_the_user_its_pods_run_as():
    from kubemaas_operator.builders.pod import RUNTIME_UID

    assert umoci_config("runtime")["User"] == str(RUNTIME_UID)


def test_the_vllm_flavour_runs_like_the_runtime_image():
    """kubemaas-runtime-vllm differs in its packages only: same entrypoint, user, env, ports."""
    assert umoci_config("runtime-vllm") == umoci_config("runtime")
    assert images_cli("ref", "runtime-vllm").strip().rsplit("/", 1)[1].startswith(
        "kubemaas-runtime-vllm:")
