"""The node-local model cache, from the fetch init container's side (`fetch --cache`).

With `--cache`, `--dest` is one entry of the node's cache (`<cache root>/<key>`, the key a hash
of the model URI with its pinned revision, chosen by the operator). The entry is complete when
its marker `.kubemaas-cache.json` exists; the marker is written last, inside a staging folder
that is renamed onto `--dest` in one step, so a reader sees all the files or none.

- a complete entry: the fetch is skipped ("cache hit"), nothing is downloaded; the marker's
  modification time is set to now (the entry's last use, which eviction reads);
- no entry: the files are fetched into `<cache root>/.partial-<key>-<pid>`, the marker written,
  and the folder renamed to the entry ("cache filled");
- two pods on one node at once: an exclusive `flock` on `<cache root>/.lock-<key>` makes the
  second wait for the first and then find the entry complete, so a node downloads once (a hit
  takes the lock too, for as long as it reads the marker: `cache-evict` holds it while it
  removes the entry, so a pod never finds an entry half removed).

Either way the container's termination message is one JSON line
`{"cache": "hit"|"filled", "key": ..., "uri": ..., "revision": ..., "bytes": ...}`, which the
operator reads from the pod's status for the per-node cache status
(kubemaas_operator/cache_status.py).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlparse

log = logging.getLogger("kubemaas_runtime.fetch")
MARKER = ".kubemaas-cache.json"
REPORT_PREFIX = "KubemaasCache: "


@dataclass(frozen=True)
class CacheEntry:
    """What the marker records, and what the termination message reports."""

    cache: str  # "hit" or "filled"
    key: str
    uri: str
    revision: str
    bytes: int

    def report(self) -> str:
        return REPORT_PREFIX + json.dumps(asdict(self), sort_keys=True)


def uri_revision(uri: str) -> str:
    """The revision a URI pins: hf://org/name@rev -> rev; hf:// without one -> main; s3:// has
    none of its own, so the key alone (the URI) identifies the copy."""
    scheme = urlparse(uri).scheme
    if scheme == "hf":
        _, _, revision = uri.partition("@")
        return revision or "main"
    return ""


def tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and p.name != MARKER)


def read_marker(entry: Path, uri: str) -> CacheEntry | None:
    """The complete entry at `entry` for `uri`, or None (missing, unreadable, another URI)."""
    try:
        data = json.loads((entry / MARKER).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("uri") != uri:
        return None
    return CacheEntry("hit", str(data.get("key", entry.name)), uri, str(data.get("revision", "")),
                      int(data.get("bytes", 0)))


@contextlib.contextmanager
def entry_lock(entry: Path) -> Iterator[None]:
    """Exclusive per entry, across every container on the node (flock on the shared cache)."""
    lock_path = entry.parent / f".lock-{entry.name}"
    with open(lock_path, "a") as handle:
        started = time.monotonic()
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("another pod on this node is filling the cache entry %s; waiting", entry.name)
            fcntl.flock(handle, fcntl.LOCK_EX)
            log.info("waited %.1fs for the cache entry %s", time.monotonic() - started, entry.name)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def fetch_through_cache(uri: str, entry: Path, fill: Callable[[Path], object]) -> CacheEntry:
    """The entry for `uri` at `entry`: found complete, or filled by `fill(staging_dir)`."""
    if not entry.parent.is_dir():
        raise OSError(f"the node cache {entry.parent} is not mounted")
    with entry_lock(entry):
        found = read_marker(entry, uri)  # complete, or filled by the pod we waited for
        if found is not None:
            # the marker's time is the entry's last use: an eviction decided before it leaves
            # the entry (cache_evict --used-before), so a pod that just found it keeps it
            os.utime(entry / MARKER)
            return found
        staging = entry.parent / f".partial-{entry.name}-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        try:
            fill(staging)
            filled = CacheEntry("filled", entry.name, uri, uri_revision(uri), tree_bytes(staging))
            marker = asdict(filled)
            del marker["cache"]
            (staging / MARKER).write_text(json.dumps(marker, sort_keys=True))
            if entry.exists():  # an incomplete entry: an empty folder kubelet made, or a stale one
                shutil.rmtree(entry)
            staging.rename(entry)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return filled
