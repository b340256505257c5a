"""HTTP routes of a text-generation model: the OpenAI API under /v1 and the KServe v2 generate
extension, Server-Sent Events for streams. Mounted by server.create_app."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from collections.abc import AsyncIterator, Callable

import orjson
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from kubemaas_runtime.admission import ClientGone, Ticket
from kubemaas_runtime.errors import (
    InvalidInput,
    ModelNotFound,
    ModelNotReady,
    PayloadTooLarge,
    RuntimeServeError,
    error_response_parts,
)
from kubemaas_runtime.generation import openai_api as api
from kubemaas_runtime.generation.adapter_routes import AdapterRoutes
from kubemaas_runtime.generation.engine_api import Chunk
from kubemaas_runtime.generation.engine_api import Stream as GenerationStream
from kubemaas_runtime.generation.sampling import SamplingParams

log = logging.getLogger("kubemaas_runtime")
JSON = "application/json"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
# Generation bodies are prompts, not tensors: a smaller cap than --max-request-bytes.
MAX_GENERATION_BODY = 8 * 1024 * 1024
CLIENT_GONE = 499  # never sent: recorded in the failure counter only


class ChunkFailed(RuntimeServeError):
    """A sequence ended by the engine with `abort` (server stopping) or `error`."""

    def __init__(self, chunk: Chunk) -> None:
        super().__init__(chunk.error or chunk.finish_reason)
        self.status_code = 503 if chunk.finish_reason == "abort" else 500


class ModelLoading(ModelNotReady):
    """The engine is still starting (vLLM takes minutes): 503 with Retry-After."""

    code = "model_loading"
    retry_after_seconds = 10

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_seconds)}


class StreamEnd:
    """A stream's bookkeeping (cancel the sequence, free the in-flight slot, count the
    request), done exactly once: after its last event, or when the response never iterated
    it because the client left before the first byte (the generator is then collected)."""

    def __init__(self, end: Callable[[int], None]) -> None:
        self.status = status = [200]

        def finish() -> None:
            end(status[0])
        self._finalizer = weakref.finalize(self, finish)

    def __call__(self, status: int | None = None) -> None:
        if status is not None:
            self.status[0] = status
        self._finalizer()


def _failed(chunk: Chunk) -> bool:
    return chunk.finish_reason in ("abort", "error")


class GenerationService:
    def __init__(self, state) -> None:
        self.state = state
        self.model = state.model
        self.model.metrics = state.metrics
        self.model.on_fatal = state.device_failed  # an engine that died (vLLM's) ends the process
        self.admission = state.admission

    def routes(self) -> list[Route]:
        return [
            Route("/v1/models", self.list_models),
            Route("/v1/models/{name}", self.get_model),
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v2/models/{name}/generate", self.v2_generate, methods=["POST"]),
            Route("/v2/models/{name}/generate_stream", self.v2_generate_stream,
                  methods=["POST"]),
            *AdapterRoutes(self.model, self._check_ready).routes(),  # LoRA load/unload
        ]

    def stop(self) -> None:
        if self.model.engine is not None:
            self.model.engine.stop()

    # -- shared --------------------------------------------------------------------------
    async def _admit(self, request: Request, slot: contextlib.ExitStack) -> dict:
        """The body as a JSON object, through the shared admission (size, deadline, memory
        budget; admission.py), then an in-flight slot held in `slot` until the answer ends
        (a stream's last event)."""
        self._check_ready()
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > MAX_GENERATION_BODY:
            raise PayloadTooLarge(f"request body of {declared} bytes exceeds the generation "
                                  f"limit of {MAX_GENERATION_BODY}")
        ticket = Ticket(self.admission)
        try:
            body = await self.admission.read_body(request, ticket)
            if len(body) > MAX_GENERATION_BODY:
                raise PayloadTooLarge(f"request body exceeds the generation limit of "
                                      f"{MAX_GENERATION_BODY} bytes")
            doc = api.parse_json_object(bytes(body))
        finally:
            ticket.release()
        slot.enter_context(self.admission.in_flight())
        return doc

    def _check_ready(self) -> None:
        state = self.state
        if not state.can_infer:
            loading = state.load_error is None and state.fatal_error is None
            raise (ModelLoading if loading else ModelNotReady)(state.not_ready_reason())

    async def _submit(self, request: api.GenerationRequest) -> GenerationStream:
        """Tokenize off the event loop, check the context, queue the sequence."""
        lm, max_len = self.model.lm, self.model.max_model_len
        api.check_prompt_size(request, max_len)
        if request.messages is not None:
            prompt_ids = await asyncio.to_thread(lm.encode_chat, request.messages)
        elif isinstance(request.prompt, str):
            prompt_ids = await asyncio.to_thread(lm.encode, request.prompt)
        else:
            vocab = self.model.vocab_size
            if any(t < 0 or t >= vocab for t in request.prompt):
                raise api.InvalidParameter("prompt", f"token ids must be in [0, {vocab})")
            prompt_ids = request.prompt
        if not prompt_ids:
            raise api.InvalidParameter("prompt", "the prompt is empty")
        max_tokens = api.resolve_max_tokens(request, len(prompt_ids), max_len)
        params = SamplingParams(max_tokens=max_tokens, temperature=request.temperature,
                                top_p=request.top_p, seed=request.seed, stop=request.stop,
                                ignore_eos=request.ignore_eos)
        adapters = getattr(self.model, "adapters", None)
        adapter = adapters.resolve(request.model) if adapters is not None else None
        if adapter is None:
            return self.model.engine.submit(prompt_ids, params)
        return self.model.engine.submit(prompt_ids, params, adapter=adapter)

    def _account(self, started: float, status: int) -> None:
        metrics = self.state.metrics
        if status != 200:
            metrics.failure(status)
        metrics.requests.inc()
        metrics.duration.observe(time.perf_counter() - started)

    # -- /v1 -----------------------------------------------------------------------------
    async def list_models(self, request: Request) -> Response:
        return _json({"object": "list", "data": [self._model_card()] + [
            self._model_card(name) for name in self._adapter_names()]})

    async def get_model(self, request: Request) -> Response:
        name = request.path_params["name"]
        if name != self.model.name and name not in self._adapter_names():
            return _openai_error(ModelNotFound(name))
        return _json(self._model_card(None if name == self.model.name else name))

    def _adapter_names(self) -> list[str]:
        adapters = getattr(self.model, "adapters", None)
        return adapters.names() if adapters is not None else []

    def _served(self) -> frozenset[str]:
        return frozenset((self.model.name, *self._adapter_names()))

    def _model_card(self, adapter: str | None = None) -> dict:
        card = {"id": adapter or self.model.name, "object": "model", "created": 0,
                "owned_by": "kubemaas", "max_model_len": self.model.max_model_len}
        if adapter is not None:  # vLLM's card of a LoRA: its base model as root and parent
            card.update(root=self.model.name, parent=self.model.name)
        return card

    async def chat(self, request: Request) -> Response:
        return await self._openai(request, chat=True)

    async def completions(self, request: Request) -> Response:
        return await self._openai(request, chat=False)

    async def _openai(self, request: Request, chat: bool) -> Response:
        started = time.perf_counter()
        slot = contextlib.ExitStack()
        try:
            doc = await self._admit(request, slot)
            parse = api.parse_chat_request if chat else api.parse_completion_request
            parsed = parse(doc, self._served())
            stream = await self._submit(parsed)
            rid = api.new_id("chatcmpl" if chat else "cmpl")
            if parsed.stream:  # the slot and the accounting go with the stream
                events = self._openai_events(stream, parsed, chat, rid,
                                             self._stream_end(stream, started, slot))
                slot = contextlib.ExitStack()
                return StreamingResponse(events, media_type="text/event-stream",
                                         headers=SSE_HEADERS)
            text, last = await _collect(stream, request)
            response = _json(api.completion_body(chat, rid, parsed.model, text,
                                                 last.finish_reason, last.prompt_tokens,
                                                 last.completion_tokens))
        except ClientGone:
            response = Response(status_code=CLIENT_GONE)
        except Exception as exc:
            if not isinstance(exc, RuntimeServeError):
                log.exception("generation request failed")
            response = _openai_error(exc)
        finally:
            slot.close()
        self._account(started, response.status_code)
        return response

    def _stream_end(self, stream: GenerationStream, started: float,
                    slot: contextlib.ExitStack) -> StreamEnd:
        def end(status: int) -> None:
            stream.cancel()  # a no-op when it finished; frees its slot when the client left
            slot.close()
            self._account(started, status)
        return StreamEnd(end)

    async def _openai_events(self, stream: GenerationStream, parsed: api.GenerationRequest,
                             chat: bool, rid: str, end: StreamEnd) -> AsyncIterator[bytes]:
        name, created = parsed.model, int(time.time())
        usage = parsed.include_usage
        status = 200
        try:
            if chat:  # OpenAI's first chunk carries the role
                yield api.sse(api.chunk_body(chat, rid, name, created, "", None, first=True,
                                             with_usage=usage))
            async for chunk in stream.chunks():
                if _failed(chunk):
                    status, _, body = api.openai_error(ChunkFailed(chunk))
                    yield api.sse(body)
                    break
                if chunk.text:
                    yield api.sse(api.chunk_body(chat, rid, name, created, chunk.text, None,
                                                 with_usage=usage))
                if chunk.finish_reason is not None:
                    yield api.sse(api.chunk_body(chat, rid, name, created, None if chat else "",
                                                 chunk.finish_reason, with_usage=usage))
                    if usage:
                        yield api.sse({"id": rid, "object": "chat.completion.chunk" if chat
                                       else "text_completion", "created": created,
                                       "model": name, "choices": [],
                                       "usage": api.usage(chunk.prompt_tokens,
                                                          chunk.completion_tokens)})
            yield api.SSE_DONE
        finally:
            end(status)

    # -- KServe v2 generate extension ----------------------------------------------------
    async def _v2_parse(self, request: Request, slot: contextlib.ExitStack
                        ) -> api.GenerationRequest:
        if request.path_params["name"] != self.model.name:
            raise ModelNotFound(request.path_params["name"])
        doc = await self._admit(request, slot)
        text = doc.get("text_input")
        if not isinstance(text, str):
            raise InvalidInput("'text_input' must be a string")
        parameters = doc.get("parameters", {})
        if not isinstance(parameters, dict):
            raise InvalidInput("'parameters' must be an object")
        return api.parse_completion_request(
            {**parameters, "model": self.model.name, "prompt": text, "stream": False},
            self.model.name)

    async def v2_generate(self, request: Request) -> Response:
        return await self._v2(request, streaming=False)

    async def v2_generate_stream(self, request: Request) -> Response:
        return await self._v2(request, streaming=True)

    async def _v2(self, request: Request, streaming: bool) -> Response:
        started = time.perf_counter()
        slot = contextlib.ExitStack()
        try:
            stream = await self._submit(await self._v2_parse(request, slot))
            if streaming:
                events = self._v2_events(stream, self._stream_end(stream, started, slot))
                slot = contextlib.ExitStack()
                return StreamingResponse(events, media_type="text/event-stream",
                                         headers=SSE_HEADERS)
            text, last = await _collect(stream, request)
            response = _json(self._v2_body(text, last))
        except ClientGone:
            response = Response(status_code=CLIENT_GONE)
        except Exception as exc:
            if not isinstance(exc, RuntimeServeError):
                log.exception("generate failed")
            status, headers, body = error_response_parts(exc)
            response = Response(body, status, headers=headers, media_type=JSON)
        finally:
            slot.close()
        self._account(started, response.status_code)
        return response

    async def _v2_events(self, stream: GenerationStream, end: StreamEnd
                         ) -> AsyncIterator[bytes]:
        status = 200
        try:
            async for chunk in stream.chunks():
                if _failed(chunk):
                    status = ChunkFailed(chunk).status_code
                    yield api.sse({"error": chunk.error})
                    break
                yield api.sse(self._v2_body(chunk.text, chunk))
        finally:
            end(status)

    def _v2_body(self, text: str, chunk: Chunk) -> dict:
        body = {"model_name": self.model.name, "model_version": "1", "text_output": text}
        if chunk.finish_reason is not None:
            body["finish_reason"] = chunk.finish_reason
            body["usage"] = api.usage(chunk.prompt_tokens, chunk.completion_tokens)
        return body


async def _collect(stream: GenerationStream, request: Request) -> tuple[str, Chunk]:
    """The whole text of a non-streamed request; the sequence is cancelled if the client
    disconnects while it waits."""
    async def cancel_on_disconnect() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        stream.cancel()

    watcher = asyncio.ensure_future(cancel_on_disconnect())
    pieces = []
    try:
        async for chunk in stream.chunks():
            if _failed(chunk):
                raise ChunkFailed(chunk)
            pieces.append(chunk.text)
            last = chunk
    finally:
        watcher.cancel()
    return "".join(pieces), last


def _json(doc, status: int = 200) -> Response:
    return Response(orjson.dumps(doc), status, media_type=JSON)


def _openai_error(exc: BaseException) -> Response:
    status, headers, body = api.openai_error(exc)
    return Response(orjson.dumps(body), status, headers=headers, media_type=JSON)
