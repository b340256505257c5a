"""What this process remembers of each ModelService, in one place: the state the applier has none of.

Per ModelService (by namespace and name) one :class:`Entry`: the lock under which its apply and
its status writes run, what its last apply did (:class:`~kubemaas_operator.reconcile.Applied`,
what its status is computed from), and the status last written until the watch delivers it. Beside
them, the cluster's GPUs as the node watch last saw them, so that a node event that changes no GPU
re-plans nothing. The status refresher owns the store (refresh.py); the reconciler applies a plan
into the entry it is handed and keeps nothing itself, so a ModelService's whole state is forgotten
in one call.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kubemaas_operator.placement import GpuNode
    from kubemaas_operator.reconcile import Applied

Key = tuple[str, str]  # (namespace, name)


@dataclass
class Entry:
    lock: threading.Lock = field(default_factory=threading.Lock)
    applied: Applied | None = None
    # the status last written, until the watch delivers it (then the object is the record again)
    written: dict | None = None


class Store:
    def __init__(self) -> None:
        self._entries: dict[Key, Entry] = {}
        self._guard = threading.Lock()
        self.gpus_seen: tuple[GpuNode, ...] | None = None  # the GPUs the node watch last saw

    def entry(self, key: Key) -> Entry:
        with self._guard:
            return self._entries.setdefault(key, Entry())

    def lock(self, key: Key) -> threading.Lock:
        return self.entry(key).lock

    def applied(self, key: Key) -> Applied | None:
        entry = self._entries.get(key)
        return entry.applied if entry is not None else None

    def managed(self) -> Sequence[tuple[Key, Applied]]:
        """Every ModelService that an apply reached, with what it did."""
        with self._guard:
            return [(key, e.applied) for key, e in self._entries.items() if e.applied is not None]

    def forget(self, key: Key) -> None:
        with self._guard:
            self._entries.pop(key, None)

    def last_status(self, key: Key, carried: dict | None) -> dict | None:
        """The ModelService's latest status: the one it ``carried`` as watched, or the one this
        process wrote while the watch has not delivered it yet. Once the object carries what was
        written, the object is the record again and the copy is dropped. Call under the lock."""
        entry = self._entries.get(key)
        if entry is None or entry.written is None:
            return carried or None
        if carried == entry.written:
            entry.written = None
            return carried
        return entry.written

    def wrote(self, key: Key, status: dict) -> None:
        """Record the status just written. Call under the lock."""
        self.entry(key).written = status
