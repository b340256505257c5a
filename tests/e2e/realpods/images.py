"""The images hack/images builds: their archives, and what an image's config and a Dockerfile's
final stage say about entrypoint, command, user, environment and ports."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import tarfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[3]
HACK_IMAGES = REPO / "hack" / "images"


def images_cli(*args: str, timeout: float = 60) -> str:
    out = subprocess.run([str(HACK_IMAGES), *args], capture_output=True, text=True,
                         timeout=timeout, check=False)
    if out.returncode != 0:
        raise AssertionError(f"hack/images {' '.join(args)} failed ({out.returncode}):\n{out.stderr}")
    return out.stdout.strip()


def archive_config(archive: Path) -> dict[str, Any]:
    """The image config (the OCI `config` object) of the single image in an OCI archive."""
    with tarfile.open(archive) as tar:
        def blob(digest: str) -> dict[str, Any]:
            member = tar.extractfile("blobs/" + digest.replace(":", "/"))
            assert member is not None, digest
            return json.load(member)

        index_file = tar.extractfile("index.json")
        assert index_file is not None
        (manifest_ref,) = json.load(index_file)["manifests"]
        manifest = blob(manifest_ref["digest"])
        return blob(manifest["config"]["digest"])["config"]


def archive_ref(archive: Path) -> str:
    with tarfile.open(archive) as tar:
        index_file = tar.extractfile("index.json")
        assert index_file is not None
        (manifest_ref,) = json.load(index_file)["manifests"]
    return manifest_ref["annotations"]["org.opencontainers.image.ref.name"]


def dockerfile_final_stage(dockerfile: Path) -> dict[str, Any]:
    """ENV, USER (with its ARG default), EXPOSE, ENTRYPOINT and CMD of the last stage."""
    text = re.sub(r"\\\n\s*", " ", dockerfile.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    start = max(i for i, line in enumerate(lines) if line.upper().startswith("FROM "))
    args: dict[str, str] = {}
    env: dict[str, str] = {}
    out: dict[str, Any] = {"env": env, "ports": []}
    for line in lines[start + 1:]:
        word, _, rest = line.partition(" ")
        word = word.upper()
        if word == "ARG" and "=" in rest:
            key, _, value = rest.partition("=")
            args[key] = value
        elif word == "ENV":
            for pair in shlex.split(rest):
                key, _, value = pair.partition("=")
                env[key] = value
        elif word == "USER":
            out["user"] = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], rest)
        elif word == "EXPOSE":
            out["ports"] += [p if "/" in p else f"{p}/tcp" for p in rest.split()]
        elif word in ("ENTRYPOINT", "CMD"):
            out[word.lower()] = json.loads(rest)
    return out
