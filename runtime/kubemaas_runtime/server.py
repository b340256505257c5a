"""The HTTP side: Open Inference Protocol (KServe v2) routes on Starlette, and the state they
share (model, batcher, metrics, readiness)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import time
from collections.abc import Callable

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from kubemaas_runtime import __version__
from kubemaas_runtime.batcher import DynamicBatcher
from kubemaas_runtime.config import ServeConfig
from kubemaas_runtime.errors import (
    InvalidInput,
    ModelLoadFailed,
    ModelNotFound,
    ModelNotReady,
    Overloaded,
    PayloadTooLarge,
    RuntimeServeError,
    error_body,
    error_response_parts,
)
from kubemaas_runtime.metrics import BoundMetrics
from kubemaas_runtime.models.base import Model, load_and_warm_up, run_predict
from kubemaas_runtime.protocol import HEADER_LENGTH, encode_infer_response, parse_infer_request

log = logging.getLogger("kubemaas_runtime")
JSON = "application/json"
MODEL_VERSION = "1"


class ServingState:
    """Everything the routes share. The model runs on one worker thread (`executor`)."""

    def __init__(self, config: ServeConfig, model: Model, metrics: BoundMetrics) -> None:
        self.config = config
        self.model = model
        self.metrics = metrics
        self.executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="model")
        self.batcher: DynamicBatcher | None = None
        self.draining = False
        self.load_error: str | None = None
        self.admitted = 0  # infer requests past admission and not yet answered
        self.request_exit: Callable[[], None] = lambda: None
        self._load_task: asyncio.Task | None = None

    @property
    def ready(self) -> bool:
        """What readiness probes see: false from the first SIGTERM on."""
        return self.can_infer and not self.draining

    @property
    def can_infer(self) -> bool:
        """Requests are still served while draining, until uvicorn closes the socket."""
        return self.model.ready and self.load_error is None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()

        async def run_batch(batch):
            return await loop.run_in_executor(self.executor, run_predict, self.model, batch)

        self.batcher = DynamicBatcher(
            run_batch, max_batch_size=self.config.max_batch_size,
            max_queue=self.config.max_queue,
            batch_timeout_s=self.config.batch_timeout_ms / 1000.0, observer=self.metrics)
        self.batcher.start()
        self._load_task = loop.create_task(self._load())

    async def _load(self) -> None:
        started = time.perf_counter()
        try:
            await asyncio.get_running_loop().run_in_executor(
                self.executor, load_and_warm_up, self.model)
        except Exception as exc:  # noqa: BLE001 - any failure to load ends the process
            # one line for the termination log, starting with the reason
            self.load_error = exc.termination_line() if isinstance(exc, ModelLoadFailed) else (
                ModelLoadFailed(f"{type(exc).__name__}: {exc}").termination_line())
            log.error("model failed to load: %s", self.load_error)
            self.request_exit()
            return
        self.metrics.load_seconds.set(time.perf_counter() - started)
        self.metrics.record_quantization(self.model.quantization, self.model.quantization_backend,
                                         self.model.drift)
        self.metrics.ready.set(1)
        log.info("model %s ready in %.2fs (%s, %s)", self.model.name,
                 time.perf_counter() - started, self.model.platform, self.model.device)

    async def stop(self) -> None:
        self.draining = True
        self.metrics.ready.set(0)
        if self.batcher is not None:
            await self.batcher.close()
        self.executor.shutdown(wait=False, cancel_futures=True)


def json_response(doc, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(doc), status, headers=headers, media_type=JSON)


def error_response(exc: BaseException) -> Response:
    status, headers, body = error_response_parts(exc)
    return Response(body, status, headers=headers, media_type=JSON)


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise InvalidInput("Content-Length is not an integer") from None
        if size > limit:
            raise PayloadTooLarge(f"request body of {size} bytes exceeds the limit of {limit}")
    chunks = []
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > limit:
            raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(state: ServingState) -> Starlette:
    model = state.model
    config = state.config
    metrics = state.metrics
    # Requests held at once (being read, queued or running): bounds memory to this many bodies.
    admission_limit = config.max_queue + config.max_batch_size

    def check_model(request: Request) -> None:
        name = request.path_params["name"]
        version = request.path_params.get("version")
        if name != model.name or version not in (None, MODEL_VERSION):
            raise ModelNotFound(name if version is None else f"{name}' version '{version}")

    async def server_metadata(request: Request) -> Response:
        return json_response({"name": "kubemaas-runtime", "version": __version__,
                              "extensions": ["binary_tensor_data"]})

    async def live(request: Request) -> Response:
        return json_response({"live": True})

    async def ready(request: Request) -> Response:
        if state.ready:
            return json_response({"ready": True})
        return json_response({"ready": False, "error": _not_ready_reason(state)}, 503)

    async def model_metadata(request: Request) -> Response:
        try:
            check_model(request)
        except RuntimeServeError as exc:
            return error_response(exc)
        return json_response(model.metadata())

    async def model_ready(request: Request) -> Response:
        try:
            check_model(request)
        except RuntimeServeError as exc:
            return error_response(exc)
        if state.ready:
            return json_response({"name": model.name, "ready": True})
        return json_response({"name": model.name, "ready": False,
                              "error": _not_ready_reason(state)}, 503)

    async def infer(request: Request) -> Response:
        started = time.perf_counter()
        metrics.inflight.inc()
        try:
            response = await _infer(request)
        except RuntimeServeError as exc:
            response = error_response(exc)
        except Exception as exc:  # a bug or a failing forward: 500, and keep serving
            log.exception("inference failed")
            response = error_response(exc)
        finally:
            metrics.inflight.dec()
        if response.status_code != 200:
            metrics.failure(response.status_code)
        metrics.requests.inc()
        metrics.duration.observe(time.perf_counter() - started)
        return response

    async def _infer(request: Request) -> Response:
        check_model(request)
        if not state.can_infer:
            raise ModelNotReady(_not_ready_reason(state))
        batcher = state.batcher
        if batcher.is_full or state.admitted >= admission_limit:
            raise Overloaded(f"request queue is full ({batcher.max_queue} waiting); retry later")
        state.admitted += 1
        try:
            body = await read_body(request, config.max_request_bytes)
            infer_request = parse_infer_request(body, request.headers.get(HEADER_LENGTH))
            del body
            inputs, rows = model.validate(infer_request)
            outputs = await batcher.submit(inputs, rows)
        finally:
            state.admitted -= 1
        if infer_request.outputs is not None:
            by_name = {t.name: t for t in outputs}
            outputs = [by_name[name] for name in infer_request.outputs]
        payload, header_length = encode_infer_response(
            model.name, MODEL_VERSION, infer_request, outputs)
        if header_length is None:
            return Response(payload, media_type=JSON)
        return Response(payload, media_type="application/octet-stream",
                        headers={"Inference-Header-Content-Length": str(header_length)})

    async def prometheus(request: Request) -> Response:
        if state.batcher is not None:
            metrics.queue_depth.set(state.batcher.queue_depth)
        return Response(generate_latest(metrics.metrics.registry),
                        headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def http_error(request: Request, exc: HTTPException) -> Response:
        return Response(error_body(exc.detail), exc.status_code, headers=exc.headers,
                        media_type=JSON)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await state.start()
        yield
        await state.stop()

    routes = [
        Route("/v2", server_metadata),
        Route("/v2/health/live", live),
        Route("/v2/health/ready", ready),
        Route("/v2/models/{name}", model_metadata),
        Route("/v2/models/{name}/versions/{version}", model_metadata),
        Route("/v2/models/{name}/ready", model_ready),
        Route("/v2/models/{name}/versions/{version}/ready", model_ready),
        Route("/v2/models/{name}/infer", infer, methods=["POST"]),
        Route("/v2/models/{name}/versions/{version}/infer", infer, methods=["POST"]),
        Route("/metrics", prometheus),
    ]
    return Starlette(routes=routes, lifespan=lifespan,
                     exception_handlers={HTTPException: http_error})  # type: ignore[dict-item]  # starlette types handlers as (Request, Exception)


def _not_ready_reason(state: ServingState) -> str:
    if state.load_error is not None:
        return f"model failed to load: {state.load_error}"
    if state.draining:
        return "server is shutting down"
    return "model is loading"
