"""`kubemaas-runtime cache-evict --root /cache --key <key>`: remove one entry of the node cache.

The operator's eviction Job (docs/api.md, node-local model cache) runs this on a node of the
cache's node group once no ModelService refers to the entry's key. It removes exactly
`<root>/<key>` and the staging folders of a fill of that key left by a killed fetch
(`.partial-<key>-<pid>`), under the entry's lock (fetch_cache.entry_lock), so it never cuts a fill
in progress on the node in half: a fill that started first completes and is then removed; a fill
that starts after waits and fetches again.

The key must be a DNS label (the operator's cache_key: a readable stem and a hash), so it can
never name a path outside the root (`..`, `/`, `.lock-x` are refused). The lock file stays: a
pod waiting on it holds it open, and a new file under the same name would let two fills in at
once. An absent entry is not an error (the Job may run again). With `--used-before T` (the time
the operator decided), an entry a pod filled or hit at or after T (its marker's time, which
`fetch --cache` sets under the same lock) is kept: a ModelService of that model created in the
meantime keeps its copy. The termination message is one
line, `KubemaasCacheEvicted: {"key": ..., "removed": true|false, "bytes": ...}`.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
from collections.abc import Mapping
from pathlib import Path

from kubemaas_runtime.fetch_cache import MARKER, entry_lock, tree_bytes
from kubemaas_runtime.termination import write_termination_log

log = logging.getLogger("kubemaas_runtime.cache_evict")
KEY_PATTERN = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
REPORT_PREFIX = "KubemaasCacheEvicted: "


class EvictError(Exception):
    pass


def add_cache_evict_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", required=True, help="the node cache's folder (the claim's mount)")
    parser.add_argument("--key", required=True, help="the entry to remove (a DNS label)")
    parser.add_argument("--used-before", type=float, default=None, metavar="EPOCH_SECONDS",
                        help="remove the entry only when it was last filled or hit before this time "
                             "(when the operator decided no ModelService refers to it); a pod that "
                             "used it since keeps it")


def evict_entry(root: Path, key: str, used_before: float | None = None) -> int | None:
    """Remove the entry `key` under `root`; its bytes, or None when there was none (or it was
    used at or after `used_before`, then it stays)."""
    if not KEY_PATTERN.fullmatch(key):
        raise EvictError(f"refusing the key {key!r}: a cache key is a DNS label, never a path")
    if not root.is_dir():
        raise EvictError(f"the node cache {root} is not mounted")
    entry = root / key
    with entry_lock(entry):
        for partial in root.glob(f".partial-{key}-*"):
            if partial.is_dir() and partial.name[len(f".partial-{key}-"):].isdigit():
                shutil.rmtree(partial, ignore_errors=True)
        if entry.is_symlink() or not entry.is_dir():
            if entry.is_symlink() or entry.exists():
                raise EvictError(f"{entry} is not a cache entry (not a folder); left as it is")
            return None
        if used_before is not None and _last_used(entry) >= used_before:
            log.info("the cache entry %s was used after the eviction was decided: kept", key)
            return None
        size = tree_bytes(entry)
        shutil.rmtree(entry)
    return size


def _last_used(entry: Path) -> float:
    """When a fetch last filled or hit the entry (its marker's time); an entry without a marker
    (a folder the kubelet made for a subPath) was never used."""
    try:
        return (entry / MARKER).stat().st_mtime
    except OSError:
        return 0.0


def cache_evict_command(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    termination_log = env.get("KUBEMAAS_TERMINATION_LOG", "/dev/termination-log")
    try:
        size = evict_entry(Path(args.root), args.key, args.used_before)
    except (EvictError, OSError) as exc:
        write_termination_log(termination_log, f"CacheEvictFailed: {exc}")
        return 1
    if size is None:
        log.info("no cache entry %s under %s: nothing to remove", args.key, args.root)
    else:
        log.info("removed the cache entry %s (%d bytes) from %s", args.key, size, args.root)
    report = {"bytes": size or 0, "key": args.key, "removed": size is not None}
    write_termination_log(termination_log, REPORT_PREFIX + json.dumps(report, sort_keys=True))
    return 0
