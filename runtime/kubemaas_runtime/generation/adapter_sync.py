"""Adapters from the runtime's configuration: `--adapters name=path,...` loaded at start, and
`--adapters-config FILE` (the operator's ConfigMap, mounted in the pod: docs/api.md "LoRA
adapters") watched, so an adapter added to or removed from the ModelService is loaded or
unloaded in the running pod without a restart, through the same registry as
`/v1/load_lora_adapter`.

The file is a JSON list of `{"name": ..., "uri": ...}`. `file:///abs/path` is read where it
is; `s3://` and `hf://` adapters are fetched by the pod's adapter-fetch container (it holds
the credentials, the serving container never does) into `--adapter-dir/<name>`, which appears
by an atomic rename once complete: the watcher loads an adapter when its directory is there.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from pathlib import Path
from urllib.parse import urlparse

from kubemaas_runtime.adapter_fetch import read_adapter_config
from kubemaas_runtime.errors import ModelNotFound, RuntimeServeError
from kubemaas_runtime.generation.adapters import AdapterRegistry

log = logging.getLogger("kubemaas_runtime")
POLL_SECONDS = 2.0


@dataclasses.dataclass(frozen=True)
class AdapterOptions:
    """The adapter flags of `serve` (config.py)."""

    max_loras: int = 0  # 0: adapters off
    max_lora_rank: int = 16
    static: tuple[tuple[str, str], ...] = ()  # --adapters name=path
    config_file: str | None = None  # --adapters-config
    adapter_dir: str = "/mnt/adapters"  # --adapter-dir


def parse_static_adapters(text: str) -> tuple[tuple[str, str], ...]:
    """`a=/path/a,b=/path/b` -> (("a", "/path/a"), ("b", "/path/b")); ValueError if malformed."""
    pairs = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--adapters takes name=path[,name=path...], got {item!r}")
        pairs.append((name, path))
    return tuple(pairs)


def local_path(uri: str, name: str, adapter_dir: str) -> Path:
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return Path(parsed.path)
    if parsed.scheme in ("s3", "hf"):
        return Path(adapter_dir) / name
    raise ValueError(f"adapter {name}: unsupported URI scheme {parsed.scheme!r}")


class AdapterConfigWatcher:
    """Reconciles the registry with the config file: loads what it lists (once its files are
    there) and unloads what it no longer lists, of the adapters it loaded itself."""

    def __init__(self, registry: AdapterRegistry, options: AdapterOptions) -> None:
        self.registry = registry
        self.options = options
        self.managed: dict[str, str] = {}  # name -> uri it was loaded from
        self.failed: dict[str, str] = {}  # name -> uri whose load was refused (not retried)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="adapter-config", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.sync()
            except Exception:
                log.exception("adapter config %s", self.options.config_file)
            self._stop.wait(POLL_SECONDS)

    def sync(self) -> None:
        assert self.options.config_file is not None
        path = Path(self.options.config_file)
        desired = read_adapter_config(path) if path.exists() else {}
        for name, uri in list(self.managed.items()):
            if desired.get(name) != uri:
                try:
                    self.registry.unload(name)
                except ModelNotFound:  # unloaded through the API meanwhile
                    pass
                del self.managed[name]
        for name, uri in desired.items():
            if name in self.managed or self.failed.get(name) == uri:
                continue
            directory = local_path(uri, name, self.options.adapter_dir)
            if not directory.is_dir():
                continue  # not fetched yet
            try:
                self.registry.load(name, str(directory))
            except RuntimeServeError as exc:
                log.error("adapter %s (%s) refused: %s", name, uri, exc)
                self.failed[name] = uri
                continue
            self.managed[name] = uri
