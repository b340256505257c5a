"""The HTTP side on Starlette: the state every route shares (`ServingState`: one lifecycle, one
admission), the routes every server has (health, v2 metadata, /metrics), and the tensor app
(`TensorApp`: Open Inference Protocol / KServe v2 infer over a DynamicBatcher). A generative
model is served by `generation.routes.GenerationApp` instead, beside it (`create_app`)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from kubemaas_runtime import __version__
from kubemaas_runtime.admission import (
    JSON_EXPANSION,
    Admission,
    AdmissionLimits,
    Ticket,
    error_response,
)
from kubemaas_runtime.auth import BearerAuth
from kubemaas_runtime.batcher import DynamicBatcher
from kubemaas_runtime.config import ServeConfig
from kubemaas_runtime.device_health import device_lost
from kubemaas_runtime.engine_choice import EngineChoice
from kubemaas_runtime.errors import (
    DeviceLost,
    InvalidInput,
    ModelNotFound,
    ModelNotReady,
    RuntimeServeError,
    error_body,
)
from kubemaas_runtime.lifecycle import Lifecycle
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

if TYPE_CHECKING:
    from kubemaas_runtime.generation.model import GenerativeBase
    from kubemaas_runtime.generation.routes import GenerationApp

__all__ = ["JSON_EXPANSION", "ServingState", "TensorApp", "check_model", "create_app"]
log = logging.getLogger("kubemaas_runtime")
JSON = "application/json"
MODEL_VERSION = "1"
# Bodies and responses larger than this are decoded / encoded on a codec thread, so the event
# loop (and with it /v2/health/live) keeps answering.
OFFLOAD_BYTES = 1 << 20
# the probes the operator renders (its runtime_contract.py, pinned by tests/unit/test_contract.py)
LIVE_PATH = "/v2/health/live"
READY_PATH = "/v2/health/ready"


class ServingState:
    """What every route shares, whichever app serves the model: the configuration, the model,
    the metrics, one `Lifecycle` (readiness, drain, termination line) and one `Admission`
    (limits, budget, in-flight slots, request metrics). The model runs on one worker thread
    (`executor`); the tensor app's `batcher` is set when it starts."""

    def __init__(self, config: ServeConfig, model: Model | GenerativeBase, metrics: BoundMetrics,
                 auth_token: bytes | None = None, engine: EngineChoice | None = None) -> None:
        self.config = config
        self.engine = engine or EngineChoice("builtin", "default", 1)
        self.auth_token = auth_token
        self.model = model
        self.metrics = metrics
        self.lifecycle = Lifecycle(metrics)
        self.executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="model")
        self.codec = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="codec")
        self.batcher: DynamicBatcher | None = None
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
        self._load_task: asyncio.Task | None = None

    # -- the lifecycle, under the names serve.py and the routes use -------------------------
    @property
    def draining(self) -> bool:
        return self.lifecycle.draining

    @draining.setter
    def draining(self, value: bool) -> None:
        self.lifecycle.draining = value

    @property
    def load_error(self) -> str | None:
        return self.lifecycle.load_error

    @property
    def fatal_error(self) -> str | None:
        return self.lifecycle.fatal_error

    @property
    def request_exit(self) -> Callable[[], None]:
        return self.lifecycle.request_exit

    @request_exit.setter
    def request_exit(self, value: Callable[[], None]) -> None:
        self.lifecycle.request_exit = value

    @property
    def ready(self) -> bool:
        return self.lifecycle.ready

    @property
    def can_infer(self) -> bool:
        return self.lifecycle.can_serve

    def not_ready_reason(self) -> str:
        return self.lifecycle.not_ready_reason()

    def device_failed(self, exc: DeviceLost) -> None:
        self.lifecycle.device_failed(exc)

    # -- loading -----------------------------------------------------------------------------
    def start_loading(self, load: Callable[[], None]) -> None:
        """Run `load` (the app's: load, warm up, gate, start an engine) on the model thread;
        ready when it returns, the process ends when it raises."""
        self._load_task = asyncio.get_running_loop().create_task(self._load(load))

    async def _load(self, load: Callable[[], None]) -> None:
        started = time.perf_counter()
        try:
            await asyncio.get_running_loop().run_in_executor(self.executor, load)
        except Exception as exc:  # noqa: BLE001 - any failure to load ends the process
            self.lifecycle.load_failed(exc)
            return
        model = self.model
        self.metrics.load_seconds.set(time.perf_counter() - started)
        self.metrics.record_quantization(model.quantization, model.quantization_backend,
                                         model.drift)
        self.lifecycle.mark_loaded()
        log.info("model %s ready in %.2fs (%s, %s)", model.name,
                 time.perf_counter() - started, model.platform, model.device)

    async def stop(self) -> None:
        self.lifecycle.drain()
        if self.batcher is not None:
            await self.batcher.close()
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.codec.shutdown(wait=False, cancel_futures=True)


class TensorApp:
    """The v2 infer routes of a tensor model (and /v1/embeddings for an encoder): requests
    join a DynamicBatcher that runs the model on the model thread."""

    def __init__(self, state: ServingState) -> None:
        self.state = state
        self.model: Model = state.model  # type: ignore[assignment]  # create_app checked it

    async def start(self) -> None:
        state, model = self.state, self.model
        loop = asyncio.get_running_loop()

        def predict(batch):
            try:
                return run_predict(model, batch)
            except Exception as exc:  # classified on the model thread: a probe may block
                if device_lost(exc, model.device):
                    raise DeviceLost(f"{type(exc).__name__}: {str(exc)[:300]}") from exc
                raise

        async def run_batch(batch):
            if state.fatal_error is not None:
                raise DeviceLost(state.fatal_error)
            try:
                return await loop.run_in_executor(state.executor, predict, batch)
            except DeviceLost as exc:
                state.device_failed(exc)
                raise

        config = state.config
        state.batcher = DynamicBatcher(
            run_batch, max_batch_size=config.max_batch_size, max_queue=config.max_queue,
            batch_timeout_s=config.batch_timeout_ms / 1000.0, observer=state.metrics,
            retry_alone=lambda exc: not isinstance(exc, (DeviceLost, ModelNotReady)))
        state.batcher.start()
        state.start_loading(lambda: load_and_warm_up(model))

    async def stop(self) -> None:
        pass

    def refresh_metrics(self) -> None:
        if self.state.batcher is not None:
            self.state.metrics.queue_depth.set(self.state.batcher.queue_depth)

    def routes(self) -> list[Route]:
        from kubemaas_runtime.embeddings import embeddings_routes  # /v1/embeddings (encoders)

        infer = self.state.admission.endpoint(self.infer)
        return [Route("/v2/models/{name}/infer", infer, methods=["POST"]),
                Route("/v2/models/{name}/versions/{version}/infer", infer, methods=["POST"]),
                *embeddings_routes(self.state)]

    async def infer(self, request: Request, ticket: Ticket) -> Response:
        state, model, admission = self.state, self.model, self.state.admission
        check_model(request, model.name)
        if not state.can_infer:
            raise ModelNotReady(state.not_ready_reason())
        body = await admission.read_body(request, ticket)
        header_length = request.headers.get(HEADER_LENGTH)
        with admission.in_flight():
            if len(body) > OFFLOAD_BYTES:
                header, inputs, rows = await self._in_codec(self.decode_request, body,
                                                            header_length, ticket)
            else:
                header, inputs, rows = self.decode_request(body, header_length, ticket)
            del body
            outputs = await state.batcher.submit(inputs, rows)
            if header.outputs is not None:
                by_name = {t.name: t for t in outputs}
                outputs = [by_name[name] for name in header.outputs]
            if sum(t.data.nbytes for t in outputs) > OFFLOAD_BYTES:
                payload, length = await self._in_codec(encode_infer_response, model.name,
                                                       MODEL_VERSION, header, outputs)
            else:
                payload, length = encode_infer_response(model.name, MODEL_VERSION, header,
                                                        outputs)
        if length is None:
            return Response(payload, media_type=JSON)
        return Response(payload, media_type="application/octet-stream",
                        headers={"Inference-Header-Content-Length": str(length)})

    def decode_request(self, body: bytearray, header_length: str | None, ticket: Ticket
                       ) -> tuple[InferHeader, dict, int]:
        """Everything that can fail for this request alone, before it can join a batch: the
        header against the limits and the model's signature, then the data, then the model's
        own per-request preparation (UTF-8, ...)."""
        limits, config, model = self.state.request_limits, self.state.config, self.model
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

    async def _in_codec(self, function, *args):
        return await asyncio.get_running_loop().run_in_executor(self.state.codec, function,
                                                                *args)


def check_model(request: Request, served: str) -> None:
    """404 unless the path names the served model (and version 1, when it names one)."""
    name = request.path_params["name"]
    version = request.path_params.get("version")
    if name != served or version not in (None, MODEL_VERSION):
        raise ModelNotFound(name if version is None else f"{name}' version '{version}")


def json_response(doc, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(doc), status, headers=headers, media_type=JSON)


def create_app(state: ServingState) -> Starlette:
    """The routes every server has (health, v2 metadata, /metrics), then those of the app that
    serves this model: `GenerationApp` (generation/routes.py) for a generative model, else
    `TensorApp`. Both run under the state's one lifecycle and one admission."""
    model = state.model
    metrics = state.metrics
    part: TensorApp | GenerationApp
    if getattr(model, "generative", False):
        from kubemaas_runtime.generation.routes import GenerationApp

        part = GenerationApp(state)
    else:
        part = TensorApp(state)

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
            check_model(request, model.name)
        except RuntimeServeError as exc:
            return error_response(exc)
        doc = model.metadata()
        doc["parameters"].setdefault("engine", state.engine.engine)
        doc["parameters"].setdefault("engine_reason", state.engine.reason)
        doc["parameters"].setdefault("tensor_parallel_size", state.engine.tensor_parallel_size)
        return json_response(doc)

    async def model_ready(request: Request) -> Response:
        try:
            check_model(request, model.name)
        except RuntimeServeError as exc:
            return error_response(exc)
        if state.ready:
            return json_response({"name": model.name, "ready": True})
        return json_response({"name": model.name, "ready": False,
                              "error": state.not_ready_reason()}, 503)

    async def prometheus(request: Request) -> Response:
        part.refresh_metrics()
        return Response(generate_latest(metrics.metrics.registry),
                        headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def http_error(request: Request, exc: HTTPException) -> Response:
        return Response(error_body(exc.detail), exc.status_code, headers=exc.headers,
                        media_type=JSON)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await part.start()
        yield
        await part.stop()
        await state.stop()

    routes = [
        Route("/v2", server_metadata),
        Route(LIVE_PATH, live),
        Route(READY_PATH, ready),
        Route("/v2/models/{name}", model_metadata),
        Route("/v2/models/{name}/versions/{version}", model_metadata),
        Route("/v2/models/{name}/ready", model_ready),
        Route("/v2/models/{name}/versions/{version}/ready", model_ready),
        Route("/metrics", prometheus),
        *part.routes(),
    ]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={HTTPException: http_error})  # type: ignore[dict-item]  # starlette types handlers as (Request, Exception)
    if state.auth_token is not None:
        app.add_middleware(BearerAuth, token=state.auth_token)
    return app
