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
    lines: list[str] = []
    for item in error.errors(include_url=False):
        path = field_path(item["loc"])
        if item["type"] == CROSS_FIELD_ERROR:
            path = (path + (item.get("ctx") or {}).get("field_path", "")).lstrip(".")
        line = f"{path}: {item['msg']}" if path else item["msg"]
        if line not in lines:
            lines.append(line)
    return lines
