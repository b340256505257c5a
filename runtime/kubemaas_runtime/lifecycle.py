"""One server's life: loading, ready, draining, failed. Shared by the tensor app (server.py) and
the generation app (generation/routes.py): readiness, the reason a request cannot be served,
and the one line the termination log gets when the process must end.

    loading --loaded()--> serving --draining (SIGTERM)--> closed
       \\--load_failed()--> exits        \\--device_failed()--> exits
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from kubemaas_runtime.errors import DeviceLost, ModelLoadFailed, ModelNotReady

log = logging.getLogger("kubemaas_runtime")


class ModelLoading(ModelNotReady):
    """The engine is still starting (vLLM takes minutes): 503 with Retry-After."""

    code = "model_loading"
    retry_after_seconds = 10

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_seconds)}


class Lifecycle:
    """Readiness and the termination line. `request_exit` is set by serve.py (uvicorn's
    should_exit); `metrics` is the BoundMetrics whose `ready` gauge follows readiness."""

    def __init__(self, metrics) -> None:
        self.metrics = metrics
        self.loaded = False
        self.draining = False
        self.load_error: str | None = None
        self.fatal_error: str | None = None  # the device failed: the process is exiting
        self.request_exit: Callable[[], None] = lambda: None

    @property
    def ready(self) -> bool:
        """What readiness probes see: false from the first SIGTERM on."""
        return self.can_serve and not self.draining

    @property
    def can_serve(self) -> bool:
        """Requests are still served while draining, until uvicorn closes the socket."""
        return self.loaded and self.load_error is None and self.fatal_error is None

    def not_ready_reason(self) -> str:
        if self.load_error is not None:
            return f"model failed to load: {self.load_error}"
        if self.fatal_error is not None:
            return f"the device failed: {self.fatal_error}"
        if self.draining:
            return "server is shutting down"
        return "model is loading"

    def unavailable(self, *, retry_while_loading: bool = False) -> ModelNotReady:
        """The error for a request that cannot be served now; while still loading, with
        `retry_while_loading`, a 503 with Retry-After (what /v1 answers)."""
        loading = self.load_error is None and self.fatal_error is None
        kind = ModelLoading if retry_while_loading and loading else ModelNotReady
        return kind(self.not_ready_reason())

    # -- transitions -----------------------------------------------------------------------
    def mark_loaded(self) -> None:
        self.loaded = True
        self.metrics.ready.set(1)

    def load_failed(self, exc: BaseException) -> None:
        # one line for the termination log, starting with the reason
        self.load_error = exc.termination_line() if isinstance(exc, ModelLoadFailed) else (
            ModelLoadFailed(f"{type(exc).__name__}: {exc}").termination_line())
        log.error("model failed to load: %s", self.load_error)
        self.request_exit()

    def device_failed(self, exc: DeviceLost) -> None:
        """The accelerator (or vLLM's engine core) is unusable: stop being ready and exit,
        so the pod restarts rather than stay Ready and fail every request."""
        if self.fatal_error is None:
            self.fatal_error = exc.termination_line()
            log.error("device failed, exiting: %s", self.fatal_error)
            self.metrics.ready.set(0)
            self.request_exit()

    def drain(self) -> None:
        self.draining = True
        self.metrics.ready.set(0)
