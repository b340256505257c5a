"""Domain errors of the runtime and their one mapping to HTTP (KServe v2 error bodies).

Every module raises these; only :func:`error_response_parts` turns them into a status code,
headers and the v2 body ``{"error": "..."}``.
"""

from __future__ import annotations

import orjson


class RuntimeServeError(Exception):
    """Base of every error a client can be told about."""

    status_code = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def headers(self) -> dict[str, str]:
        return {}


class InvalidInput(RuntimeServeError):
    """The request is malformed or does not match the model's signature."""

    status_code = 400


class ModelNotFound(RuntimeServeError):
    status_code = 404

    def __init__(self, name: str) -> None:
        super().__init__(f"model '{name}' is not served here")


class ModelNotReady(RuntimeServeError):
    status_code = 503

    def __init__(self, message: str = "model is not ready") -> None:
        super().__init__(message)


class Overloaded(RuntimeServeError):
    """The request queue is full: retry later (HTTP 503 with Retry-After)."""

    status_code = 503
    retry_after_seconds = 1

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_seconds)}


class PayloadTooLarge(RuntimeServeError):
    status_code = 413


class RequestTimeout(RuntimeServeError):
    """The request body did not arrive within --body-timeout-seconds."""

    status_code = 408

    def headers(self) -> dict[str, str]:
        return {"Connection": "close"}


class Unauthorized(RuntimeServeError):
    """No bearer token, or the wrong one (--auth-token-file)."""

    status_code = 401

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": 'Bearer realm="kubemaas"'}


class DeviceLost(RuntimeServeError):
    """The accelerator failed in a way that leaves it unusable: the process exits."""

    status_code = 503
    reason = "DeviceLost"

    def termination_line(self) -> str:
        return f"{self.reason}: {' '.join(self.message.split())}"


class ModelLoadFailed(Exception):
    """The model could not be loaded: the process exits non-zero with this as its reason."""

    reason = "ModelLoadFailed"  # the first word of the termination message

    def termination_line(self) -> str:
        return f"{self.reason}: {' '.join(str(self).split())}"


class QuantizationUnsupported(ModelLoadFailed):
    """The variant's quantization cannot run on this device, hardware, model or torch."""

    reason = "QuantizationUnsupported"


class QuantizationDriftExceeded(ModelLoadFailed):
    """The quantized variant drifts from full precision by more than --max-drift."""

    reason = "QuantizationDriftExceeded"


def error_body(message: str) -> bytes:
    return orjson.dumps({"error": message})


def error_response_parts(exc: BaseException) -> tuple[int, dict[str, str], bytes]:
    """Status code, extra headers and v2 body for any exception raised while serving."""
    if isinstance(exc, RuntimeServeError):
        return exc.status_code, exc.headers(), error_body(exc.message)
    return 500, {}, error_body(f"internal error: {type(exc).__name__}: {exc}")
