"""`kubemaas-runtime fetch-adapters`: the pod's adapter-fetch sidecar (docs/api.md "LoRA
adapters"). It watches the operator's adapter ConfigMap (a JSON list of {name, uri}) and
keeps `--dest` holding one directory per s3:// or hf:// adapter it lists: fetched under
`.partial-<name>`, then renamed to `<name>` (so the serving container, which watches the same
list, sees an adapter only when complete), and removed when the list drops it. It holds the
model's credentials (secretRef); the serving container never does. Files are fetched by the
same code and rules as the model (fetch.py: no pickles, pinned hub revisions)."""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import threading
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlparse

from kubemaas_runtime.fetch import fetch

log = logging.getLogger("kubemaas_runtime.fetch")
PARTIAL = ".partial-"
POLL_SECONDS = 2.0
MAX_CONFIG_BYTES = 1 << 20


def read_adapter_config(path: Path) -> dict[str, str]:
    """name -> uri from the mounted file (ValueError when it is not such a list)."""
    raw = path.read_bytes()[:MAX_CONFIG_BYTES + 1]
    if len(raw) > MAX_CONFIG_BYTES:
        raise ValueError(f"{path} is larger than {MAX_CONFIG_BYTES} bytes")
    doc = json.loads(raw or b"[]")
    if not isinstance(doc, list) or not all(
            isinstance(a, dict) and isinstance(a.get("name"), str) and isinstance(a.get("uri"), str)
            for a in doc):
        raise ValueError(f"{path} must hold a JSON list of {{name, uri}} objects")
    return {a["name"]: a["uri"] for a in doc}


def add_fetch_adapters_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="the adapter list (JSON) to follow")
    parser.add_argument("--dest", required=True, help="directory of one sub-directory per adapter")
    parser.add_argument("--max-bytes", type=int, default=None, help="most bytes of one adapter")
    parser.add_argument("--once", action="store_true", help="sync once and exit (tests)")


def sync_adapter_dir(config: Path, dest: Path, env: Mapping[str, str], max_bytes: int | None,
                     failed: dict[str, str]) -> None:
    """One pass: fetch what is listed and missing, remove what is no longer listed."""
    desired = read_adapter_config(config) if config.exists() else {}
    fetched = {name: uri for name, uri in desired.items()
               if urlparse(uri).scheme in ("s3", "hf")}
    dest.mkdir(parents=True, exist_ok=True)
    for entry in dest.iterdir():
        if entry.is_dir() and entry.name not in fetched:
            shutil.rmtree(entry, ignore_errors=True)  # dropped from the list, or a stale partial
    for name, uri in fetched.items():
        if (dest / name).is_dir() or failed.get(name) == uri:
            continue
        partial = dest / f"{PARTIAL}{name}"
        shutil.rmtree(partial, ignore_errors=True)
        try:
            fetch(uri, partial, env, max_bytes)
        except Exception as exc:  # noqa: BLE001 - one bad adapter must not stop the others
            log.error("adapter %s: fetching %s failed: %s", name, uri, exc)
            failed[name] = uri
            shutil.rmtree(partial, ignore_errors=True)
            continue
        partial.rename(dest / name)
        log.info("adapter %s fetched from %s", name, uri)


def fetch_adapters_command(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    failed: dict[str, str] = {}
    stop = threading.Event()
    while True:
        try:
            sync_adapter_dir(Path(args.config), Path(args.dest), env, args.max_bytes, failed)
        except ValueError as exc:  # a malformed list: wait for the next write
            log.error("adapter config %s: %s", args.config, exc)
        if args.once:
            return 0
        stop.wait(POLL_SECONDS)
