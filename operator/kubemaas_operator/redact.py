"""A container's termination message, made safe to copy into a ModelService's status: its first
line, capped, with anything shaped like an environment assignment or a credential masked (with
terminationMessagePolicy FallbackToLogsOnError the message may be the tail of a log, which can
hold anything the process printed)."""

from __future__ import annotations

import re

MAX_MESSAGE_CHARS = 512
MASK = "<redacted>"
_PATTERNS = (
    # NAME=value, as env dumps and shell traces print (HF_TOKEN=hf_..., AWS_SECRET_ACCESS_KEY=...)
    re.compile(r"\b([A-Z][A-Z0-9_]{2,})=(\"[^\"]*\"|'[^']*'|\S+)"),
    # bearer tokens, then "token: x", "password=x" and the like
    re.compile(r"(?i)\b(bearer|basic)(\s+)(\S+)"),
    re.compile(r"(?i)\b(token|password|secret|api[-_]?key)(\s*[:=]\s*)(\S+)"),
    # well-known credential shapes: Hugging Face and AWS access keys
    re.compile(r"\b(hf_[A-Za-z0-9]{20,}|AKIA[0-9A-Z]{16}|ASIA[0-9A-Z]{16})\b"),
)


def safe_termination_line(message: str) -> str:
    """The first non-empty line of `message`, masked and cut to MAX_MESSAGE_CHARS."""
    line = next((part.strip() for part in message.splitlines() if part.strip()), "")
    line = _PATTERNS[0].sub(lambda m: f"{m.group(1)}={MASK}", line)
    for pattern in _PATTERNS[1:3]:
        line = pattern.sub(lambda m: f"{m.group(1)}{m.group(2)}{MASK}", line)
    line = _PATTERNS[3].sub(MASK, line)
    if len(line) > MAX_MESSAGE_CHARS:
        line = line[:MAX_MESSAGE_CHARS - 3] + "..."
    return line
