"""Why a ModelService, or one of its variants, cannot run: the one carrier every blocker uses.

A policy refusal (ImageNotAllowed, UntrustedModelSource), a variant no GPU holds
(GPUMemoryInsufficient), an engine that cannot shard (EngineCannotShard), a name held by someone
else (NameConflict) and a pod's own failure (Unschedulable, CrashLoopBackOff) all reach the
status as one ``Problem``: a CamelCase reason and a message phrased for a person.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    """A reason that blocks readiness, already phrased for a person."""

    reason: str
    message: str
