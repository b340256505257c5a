"""The one writer of the termination log: the single line Kubernetes shows as the container's
termination message (and the operator copies, capped, into a condition)."""

from __future__ import annotations

import logging
import sys

log = logging.getLogger("kubemaas_runtime")
# Kubernetes keeps at most 4096 bytes of a termination message; the reason fits in far less.
MAX_LINE_BYTES = 2048


def termination_line(text: str) -> str:
    """`text` on one line, whitespace collapsed, cut to MAX_LINE_BYTES of UTF-8."""
    line = " ".join(text.split())
    raw = line.encode("utf-8")
    if len(raw) > MAX_LINE_BYTES:
        line = raw[:MAX_LINE_BYTES - 3].decode("utf-8", "ignore") + "..."
    return line


def write_termination_log(path: str, text: str) -> None:
    """Write the reason to `path` (and stderr); a path that cannot be written is logged."""
    line = termination_line(text)
    print(line, file=sys.stderr, flush=True)
    try:
        with open(path, "w") as handle:
            handle.write(line + "\n")
    except OSError as exc:
        log.warning("cannot write termination log %s: %s", path, exc)
