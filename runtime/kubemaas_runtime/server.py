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
from kubemaas_runtime.admission import Admission, AdmissionLimits, Ticket, error_response
from kubemaas_runtime.auth import BearerAuth
from kubemaas_runtime.batcher import DynamicBatcher
from kubemaas_runtime.config import ServeConfig
from kubemaas_runtime.device_health import device_lost
from kubemaas_runtime.engine_choice import EngineChoice
from kubemaas_runtime.errors import (
    DeviceLost,
    InvalidInput,
    ModelLoadFailed,
    ModelNotFound,
    ModelNotReady,
    RuntimeServeError,
    error_body,
)
from kubemaas_runtime.metrics import BoundMetrics
from kubemaas_runtime.models.base import Model, load_and_warm_up, run_predict
from kubemaas_runtime.protocol import (
    HEADER_LENGTH,
    InferHeader,
    RequestLimits,
    decoded_size,
    encode_infer_response,
    parse_infer_header,
)

log = logging.getLogger("kubemaas_runtime")
JSON = "application/json"
MODEL_VERSION = "1"
# Bodies and responses larger than this are decoded / encoded on a codec thread, so the event
# loop (and with it /v2/health/live) keeps answering.
OFFLOAD_BYTES = 1 << 20
# Python objects orjson makes per byte of JSON at worst (a one-digit number and its comma
# become a float object and a list slot): charged to the budget while a JSON part is parsed.
JSON_EXPANSION = 24


class ServingState:
    """Everything the routes share. The model runs on one worker thread (`executor`)."""

    def __init__(self, config: ServeConfig, model: Model, metrics: BoundMetrics,
                 auth_token: bytes | None = None, engine: EngineChoice | None = None) -> None:
        self.config = config
        self.engine = engine or EngineChoice("builtin", "default", 1)
        self.auth_token = auth_token
        self.model = model
        self.metrics = metrics
        self.executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="model")
        self.codec = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="codec")
        self.batcher: DynamicBatcher | None = None
        self.draining = False
        self.load_error: str | None = None
        self.fatal_error: str | None = None  # the device failed: the process is exiting
        self.request_limits = RequestLimits(
            max_tensor_rank=config.max_tensor_rank,
            max_tensor_elements=config.max_tensor_elements,
            max_string_bytes=config.max_string_bytes, max_json_bytes=config.max_json_bytes)
        self.admission = Admission(
            AdmissionLimits(max_inflight=config.max_queue + config.max_batch_size,
                            max_request_bytes=config.max_request_bytes,
                            max_buffered_bytes=config.max_buffered_bytes,
                            body_timeout_s=config.body_timeout_seconds),
            metrics, queue_full=lambda: self.batcher is not None and self.batcher.is_full)
        self.request_exit: Callable[[], None] = lambda: None
        self._load_task: asyncio.Task | None = None

    @property
    def ready(self) -> bool:
        """What readiness probes see: false from the first SIGTERM on."""
        return self.can_infer and not self.draining

    @property
    def can_infer(self) -> bool:
        """Requests are still served while draining, until uvicorn closes the socket."""
        return self.model.ready and self.load_error is None and self.fatal_error is None

    def not_ready_reason(self) -> str:
        if self.load_error is not None:
            return f"model failed to load: {self.load_error}"
        if self.fatal_error is not None:
            return f"the device failed: {self.fatal_error}"
        if self.draining:
            return "server is shutting down"
        return "model is loading"

    async def start(self) -> None:
        loop = asyncio.get_running_loop()

        def predict(batch):
            try:
                return run_predict(self.model, batch)
            except Exception as exc:  # classified on the model thread: a probe may block
                if device_lost(exc, self.model.device):
                    raise DeviceLost(f"{type(exc).__name__}: {str(exc)[:300]}") from exc
                raise

        async def run_batch(batch):
            if self.fatal_error is not None:
                raise DeviceLost(self.fatal_error)
            try:
                return await loop.run_in_executor(self.executor, predict, batch)
            except DeviceLost as exc:
                self.device_failed(exc)
                raise

        if self.model.options.task != "text-generation":  # generation has its own engine
            self.batcher = DynamicBatcher(
                run_batch, max_batch_size=self.config.max_batch_size,
                max_queue=self.config.max_queue,
                batch_timeout_s=self.config.batch_timeout_ms / 1000.0, observer=self.metrics,
                retry_alone=lambda exc: not isinstance(exc, (DeviceLost, ModelNotReady)))
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

    def device_failed(self, exc: DeviceLost) -> None:
        """The accelerator is unusable: stop being ready and exit, so the pod restarts rather
        than stay Ready and fail every request."""
        if self.fatal_error is None:
            self.fatal_error = exc.termination_line()
            log.error("device failed, exiting: %s", self.fatal_error)
            self.metrics.ready.set(0)
            self.request_exit()

    async def stop(self) -> None:
        self.draining = True
        self.metrics.ready.set(0)
        if self.batcher is not None:
            await self.batcher.close()
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.codec.shutdown(wait=False, cancel_futures=True)


def json_response(doc, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(doc), status, headers=headers, media_type=JSON)


def create_app(state: ServingState) -> Starlette:
    model = state.model
    config = state.config
    metrics = state.metrics
    admission = state.admission
    limits = state.request_limits

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
        return json_response({"ready": False, "error": state.not_ready_reason()}, 503)

    async def model_metadata(request: Request) -> Response:
        try:
            check_model(request)
        except RuntimeServeError as exc:
            return error_response(exc)
        doc = model.metadata()
        doc["parameters"].setdefault("engine", state.engine.engine)
        doc["parameters"].setdefault("engine_reason", state.engine.reason)
        doc["parameters"].setdefault("tensor_parallel_size", state.engine.tensor_parallel_size)
        return json_response(doc)

    async def model_ready(request: Request) -> Response:
        try:
            check_model(request)
        except RuntimeServeError as exc:
            return error_response(exc)
        if state.ready:
            return json_response({"name": model.name, "ready": True})
        return json_response({"name": model.name, "ready": False,
                              "error": state.not_ready_reason()}, 503)

    @admission.endpoint
    async def infer(request: Request, ticket: Ticket) -> Response:
        check_model(request)
        if not state.can_infer:
            raise ModelNotReady(state.not_ready_reason())
        body = await admission.read_body(request, ticket)
        header_length = request.headers.get(HEADER_LENGTH)
        with admission.in_flight():
            if len(body) > OFFLOAD_BYTES:
                header, inputs, rows = await _in_codec(decode_request, body, header_length,
                                                       ticket)
            else:
                header, inputs, rows = decode_request(body, header_length, ticket)
            del body
            outputs = await state.batcher.submit(inputs, rows)
            if header.outputs is not None:
                by_name = {t.name: t for t in outputs}
                outputs = [by_name[name] for name in header.outputs]
            if sum(t.data.nbytes for t in outputs) > OFFLOAD_BYTES:
                payload, length = await _in_codec(encode_infer_response, model.name,
                                                  MODEL_VERSION, header, outputs)
            else:
                payload, length = encode_infer_response(model.name, MODEL_VERSION, header,
                                                        outputs)
        if length is None:
            return Response(payload, media_type=JSON)
        return Response(payload, media_type="application/octet-stream",
                        headers={"Inference-Header-Content-Length": str(length)})

    def decode_request(body: bytearray, header_length: str | None, ticket: Ticket
                       ) -> tuple[InferHeader, dict, int]:
        """Everything that can fail for this request alone, before it can join a batch: the
        header against the limits and the model's signature, then the data, then the model's
        own per-request preparation (UTF-8, ...)."""
        json_size = len(body) if header_length is None else min(
            len(body), int(header_length) if header_length.isdigit() else 0)
        json_charge = min(json_size, limits.max_json_bytes) * JSON_EXPANSION
        ticket.charge(json_charge)
        try:
            header = parse_infer_header(body, header_length, limits)
            _, rows = model.validate(header)
            if rows > config.max_batch_size:
                raise InvalidInput(f"request has {rows} rows but the max batch size is "
                                   f"{config.max_batch_size}")
            decoded = header.decode()
        finally:
            ticket.refund(json_charge)
        # decoded tensors that do not share the body's memory count against the budget too
        ticket.charge(sum(decoded_size(h, t) for h, t in zip(header.inputs, decoded.inputs)))
        inputs = model.prepare({t.name: t for t in decoded.inputs})
        return header, inputs, rows

    async def _in_codec(function, *args):
        return await asyncio.get_running_loop().run_in_executor(state.codec, function, *args)

    async def prometheus(request: Request) -> Response:
        if state.batcher is not None:
            metrics.queue_depth.set(state.batcher.queue_depth)
        return Response(generate_latest(metrics.metrics.registry),
                        headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def http_error(request: Request, exc: HTTPException) -> Response:
        return Response(error_body(exc.detail), exc.status_code, headers=exc.headers,
                        media_type=JSON)

    generation = None
    if model.options.task == "text-generation":  # /v1 and v2 generate (generation/routes.py)
        from kubemaas_runtime.generation.routes import GenerationService

        generation = GenerationService(state)
    from kubemaas_runtime.embeddings import embeddings_routes  # /v1/embeddings (encoders)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await state.start()
        yield
        if generation is not None:
            await asyncio.to_thread(generation.stop)
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
        *(generation.routes() if generation is not None else []),
        *embeddings_routes(state),
    ]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={HTTPException: http_error})  # type: ignore[dict-item]  # starlette types handlers as (Request, Exception)
    if state.auth_token is not None:
        app.add_middleware(BearerAuth, token=state.auth_token)
    return app


def _not_ready_reason(state: ServingState) -> str:  # embeddings.py's name for it
    return state.not_ready_reason()
