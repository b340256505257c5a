"""Validation errors as `field.path: message` lines, the way the API server names fields."""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import ValidationError

from kubemaas_operator.api.rules import CROSS_FIELD_ERROR

# Location parts pydantic adds for union members; they are types, not fields.
_TYPE_TAGS = frozenset({"int", "str", "float", "bool", "constrained-str", "constrained-int", "list", "dict"})


def field_path(loc: Sequence[str | int]) -> str:
    """('spec', 'variants', 1, 'weight') -> 'spec.variants[1].weight'."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part in _TYPE_TAGS or "[" in part:
            continue
        else:
            path += f".{part}"
    return path.lstrip(".")


def describe_errors(error: ValidationError) -> list[str]:
    """One line per problem: `spec.autoscaling.minReplicas: autoscaling.minReplicas must ...`.

    A cross-field rule's error carries the CEL rule's fieldPath, appended here so the line names
    the same field the API server names.
    """
    by_path: dict[str, list[str]] = {}
    for item in error.errors(include_url=False):
        path = field_path(item["loc"])
        if item["type"] == CROSS_FIELD_ERROR:
            path = (path + (item.get("ctx") or {}).get("field_path", "")).lstrip(".")
        messages = by_path.setdefault(path, [])
        if any(part in _TYPE_TAGS for part in item["loc"] if isinstance(part, str)):
            messages.clear()  # an int-or-string field: the string branch's message says most
        if item["msg"] not in messages:
            messages.append(item["msg"])
    return [f"{path}: {msg}" if path else msg for path, msgs in by_path.items() for msg in msgs]
