"""The generation app: the HTTP routes of a text-generation model, beside the tensor app
(server.TensorApp) and mounted by server.create_app in its place. The OpenAI API under /v1 and
the KServe v2 generate extension, Server-Sent Events for streams.

It shares the server's one `Lifecycle` (readiness, drain, termination log) and one
`Admission`: every inference route is an `Admission.endpoint` (errors, request metrics), and a
stream holds its in-flight slot until its last event or until the client goes away
(admission.EventStream). Below it is one `engine_api.Engine`, whichever engine runs."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
import torch
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from kubemaas_runtime.admission import (
    CLIENT_GONE,
    SSE_HEADERS,
    EventStream,
    StreamOutcome,
    Ticket,
)
from kubemaas_runtime.errors import (
    InvalidInput,
    ModelNotFound,
    PayloadTooLarge,
    RuntimeServeError,
)
from kubemaas_runtime.generation import openai_api as api
from kubemaas_runtime.generation.engine_api import Chunk, Engine
from kubemaas_runtime.generation.engine_api import Stream as GenerationStream
from kubemaas_runtime.generation.model import GenerativeBase
from kubemaas_runtime.generation.sampling import SamplingParams
from kubemaas_runtime.lifecycle import ModelLoading

__all__ = ["CLIENT_GONE", "SSE_HEADERS", "ChunkFailed", "GenerationApp", "ModelLoading"]
log = logging.getLogger("kubemaas_runtime")
JSON = "application/json"
# Generation bodies are prompts, not tensors: a smaller cap than --max-request-bytes.
MAX_GENERATION_BODY = 8 * 1024 * 1024
MAX_TOKEN_TEXTS = 1 << 17  # tokens' texts kept for logprobs (a vocabulary's worth)


class ChunkFailed(RuntimeServeError):
    """A sequence ended by the engine with `abort` (server stopping) or `error`."""

    def __init__(self, chunk: Chunk) -> None:
        super().__init__(chunk.error or chunk.finish_reason)
        self.status_code = 503 if chunk.finish_reason == "abort" else 500


def _failed(chunk: Chunk) -> bool:
    return chunk.finish_reason in ("abort", "error")


class GenerationApp:
    """The routes, the loading (model, then its engine with the server's metrics) and the
    stopping of a generative model."""

    def __init__(self, state) -> None:
        self.state = state
        self.model: GenerativeBase = state.model
        self.lifecycle = state.lifecycle
        self.admission = state.admission
        self.engine: Engine | None = None
        self._token_texts: dict[int, str] = {}

    # -- the app's life ------------------------------------------------------------------
    async def start(self) -> None:
        self.state.start_loading(self._load)

    def _load(self) -> None:
        """On the model thread: load, warm up, gate, then the engine with the metrics."""
        model = self.model
        model.load()
        with torch.inference_mode():
            model.warmup()
        model.check_accuracy()
        self.engine = model.start_engine(self.state.metrics, self.lifecycle.device_failed)

    async def stop(self) -> None:
        if self.engine is not None:
            await asyncio.to_thread(self.engine.stop)

    def refresh_metrics(self) -> None:
        pass  # the engine publishes its gauges itself

    def routes(self) -> list[Route]:
        openai = self._openai_endpoint
        return [
            Route("/v1/models", self.list_models),
            Route("/v1/models/{name}", self.get_model),
            Route("/v1/chat/completions", openai(self.chat), methods=["POST"]),
            Route("/v1/completions", openai(self.completions), methods=["POST"]),
            Route("/v2/models/{name}/generate", self.admission.endpoint(self.v2_generate),
                  methods=["POST"]),
            Route("/v2/models/{name}/generate_stream",
                  self.admission.endpoint(self.v2_generate_stream), methods=["POST"]),
            Route("/v2/models/{name}/infer", self.admission.endpoint(self.infer),
                  methods=["POST"]),
            Route("/v2/models/{name}/versions/{version}/infer",
                  self.admission.endpoint(self.infer), methods=["POST"]),
        ]

    def _openai_endpoint(self, handler):
        return self.admission.endpoint(handler, errors=_openai_error)

    # -- shared --------------------------------------------------------------------------
    def _check_ready(self) -> None:
        if not self.lifecycle.can_serve or self.engine is None:
            raise self.lifecycle.unavailable(retry_while_loading=True)

    async def _admit(self, request: Request, ticket: Ticket) -> dict:
        """The body as a JSON object, through the shared admission (size, deadline, memory
        budget; admission.py), then an in-flight slot held until the answer ends (a stream's
        last event)."""
        self._check_ready()
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > MAX_GENERATION_BODY:
            raise PayloadTooLarge(f"request body of {declared} bytes exceeds the generation "
                                  f"limit of {MAX_GENERATION_BODY}")
        body = await self.admission.read_body(request, ticket)
        if len(body) > MAX_GENERATION_BODY:
            raise PayloadTooLarge(f"request body exceeds the generation limit of "
                                  f"{MAX_GENERATION_BODY} bytes")
        doc = api.parse_json_object(bytes(body))
        del body
        ticket.release()  # the prompt is parsed: its bytes no longer count against the budget
        ticket.hold_slot()
        return doc

    async def _submit(self, request: api.GenerationRequest) -> list[GenerationStream]:
        """Tokenize off the event loop, check the context and the engine's features, queue
        the request's `n` sequences (seeds seed, seed+1, ...: n different samples that a
        seed repeats); all or none: a refused one cancels those already queued."""
        model, engine = self.model, self.engine
        api.check_features(request, engine.features, self.state.engine.engine)
        lm, max_len = model.lm, model.max_model_len
        api.check_prompt_size(request, max_len)
        if request.messages is not None:
            prompt_ids = await asyncio.to_thread(lm.encode_chat, request.messages)
        elif isinstance(request.prompt, str):
            prompt_ids = await asyncio.to_thread(lm.encode, request.prompt)
        else:
            vocab = model.vocab_size
            if any(t < 0 or t >= vocab for t in request.prompt):
                raise api.InvalidParameter("prompt", f"token ids must be in [0, {vocab})")
            prompt_ids = request.prompt
        if not prompt_ids:
            raise api.InvalidParameter("prompt", "the prompt is empty")
        max_tokens = api.resolve_max_tokens(request, len(prompt_ids), max_len)
        params = SamplingParams(
            max_tokens=max_tokens, temperature=request.temperature, top_p=request.top_p,
            seed=request.seed, stop=request.stop, ignore_eos=request.ignore_eos,
            top_k=request.top_k, presence_penalty=request.presence_penalty,
            frequency_penalty=request.frequency_penalty, logprobs=request.logprobs,
            json_schema=request.json_schema)
        streams: list[GenerationStream] = []
        try:
            for index in range(request.n):
                seeded = params if index == 0 or params.seed is None else dataclasses.replace(
                    params, seed=params.seed + index)
                streams.append(engine.submit(prompt_ids, seeded))
        except BaseException:
            for stream in streams:
                stream.cancel()
            raise
        return streams

    @staticmethod
    def _streamed(events, streams: list[GenerationStream], outcome: StreamOutcome
                  ) -> EventStream:
        def cancel(status: int) -> None:
            for stream in streams:
                stream.cancel()  # a no-op when it finished
        outcome.on_end(cancel)
        return EventStream(events, outcome)

    def token_text(self, token: int) -> str:
        """One token as text, special tokens included (what logprobs name)."""
        text = self._token_texts.get(token)
        if text is None:
            text = self.model.lm.tokenizer.decode([token], skip_special_tokens=False)
            if len(self._token_texts) < MAX_TOKEN_TEXTS:
                self._token_texts[token] = text
        return text

    def _logprobs(self, chat: bool, token_ids, entries, offset: int) -> dict[str, Any] | None:
        if entries is None:
            return None
        if chat:
            return api.chat_logprobs(token_ids, entries, self.token_text)
        return api.completion_logprobs(token_ids, entries, self.token_text, offset)

    # -- /v1 -----------------------------------------------------------------------------
    async def list_models(self, request: Request) -> Response:
        return _json({"object": "list", "data": [self._model_card()]})

    async def get_model(self, request: Request) -> Response:
        if request.path_params["name"] != self.model.name:
            return _openai_error(ModelNotFound(request.path_params["name"]))
        return _json(self._model_card())

    def _model_card(self) -> dict:
        return {"id": self.model.name, "object": "model", "created": 0,
                "owned_by": "kubemaas", "max_model_len": self.model.max_model_len}

    async def chat(self, request: Request, ticket: Ticket) -> Response:
        return await self._openai(request, ticket, chat=True)

    async def completions(self, request: Request, ticket: Ticket) -> Response:
        return await self._openai(request, ticket, chat=False)

    async def _openai(self, request: Request, ticket: Ticket, chat: bool) -> Response:
        doc = await self._admit(request, ticket)
        parse = api.parse_chat_request if chat else api.parse_completion_request
        parsed = parse(doc, self.model.name)
        streams = await self._submit(parsed)
        rid = api.new_id("chatcmpl" if chat else "cmpl")
        if parsed.stream:  # the slot and the accounting go with the stream
            outcome = StreamOutcome()
            return self._streamed(self._openai_events(streams, parsed, chat, rid, outcome),
                                  streams, outcome)
        results = await _collect(streams, request)
        choices = [api.choice_body(chat, index, result.text, result.last.finish_reason,
                                   self._logprobs(chat, result.token_ids, result.logprobs, 0))
                   for index, result in enumerate(results)]
        return _json(api.completion_body(
            chat, rid, self.model.name, choices, results[0].last.prompt_tokens,
            sum(r.last.completion_tokens for r in results)))

    async def _openai_events(self, streams: list[GenerationStream],
                             parsed: api.GenerationRequest, chat: bool, rid: str,
                             outcome: StreamOutcome) -> AsyncIterator[bytes]:
        name, created = self.model.name, int(time.time())
        usage = parsed.include_usage
        if chat:  # OpenAI's first chunk of each choice carries the role
            for index in range(len(streams)):
                yield api.sse(api.chunk_body(chat, rid, name, created, "", None, first=True,
                                             with_usage=usage, index=index))
        offsets = [0] * len(streams)  # characters sent per choice (completions' text_offset)
        prompt_tokens, completion_tokens = 0, [0] * len(streams)
        async for index, chunk in _merged(streams):
            if _failed(chunk):
                status, _, body = api.openai_error(ChunkFailed(chunk))
                outcome.fail(status)
                yield api.sse(body)
                break
            if chunk.text or chunk.logprobs:
                logprobs = self._logprobs(chat, chunk.token_ids, chunk.logprobs, offsets[index])
                offsets[index] += len(chunk.text)
                yield api.sse(api.chunk_body(chat, rid, name, created, chunk.text, None,
                                             with_usage=usage, index=index, logprobs=logprobs))
            if chunk.finish_reason is not None:
                prompt_tokens = chunk.prompt_tokens
                completion_tokens[index] = chunk.completion_tokens
                yield api.sse(api.chunk_body(chat, rid, name, created, None if chat else "",
                                             chunk.finish_reason, with_usage=usage,
                                             index=index))
        else:
            if usage:
                yield api.sse({"id": rid, "object": "chat.completion.chunk" if chat
                               else "text_completion", "created": created, "model": name,
                               "choices": [],
                               "usage": api.usage(prompt_tokens, sum(completion_tokens))})
        yield api.SSE_DONE

    # -- KServe v2 generate extension ----------------------------------------------------
    async def infer(self, request: Request, ticket: Ticket) -> Response:
        name, version = request.path_params["name"], request.path_params.get("version")
        if name != self.model.name or version not in (None, "1"):
            raise ModelNotFound(name if version is None else f"{name}' version '{version}")
        if not self.lifecycle.can_serve:
            raise self.lifecycle.unavailable()
        raise InvalidInput(f"model '{name}' generates text: use /v1/chat/completions, "
                           f"/v1/completions or /v2/models/{name}/generate")

    async def _v2_parse(self, request: Request, ticket: Ticket) -> api.GenerationRequest:
        if request.path_params["name"] != self.model.name:
            raise ModelNotFound(request.path_params["name"])
        doc = await self._admit(request, ticket)
        text = doc.get("text_input")
        if not isinstance(text, str):
            raise InvalidInput("'text_input' must be a string")
        parameters = doc.get("parameters", {})
        if not isinstance(parameters, dict):
            raise InvalidInput("'parameters' must be an object")
        for field in ("n", "logprobs"):  # one text_output per answer, and no logprobs in it
            if parameters.get(field) not in (None, 1 if field == "n" else None):
                raise api.InvalidParameter(field, f"'parameters.{field}' is not supported by "
                                                  f"v2 generate (use /v1/completions)")
        return api.parse_completion_request(
            {**parameters, "model": self.model.name, "prompt": text, "stream": False},
            self.model.name)

    async def v2_generate(self, request: Request, ticket: Ticket) -> Response:
        streams = await self._submit(await self._v2_parse(request, ticket))
        (result,) = await _collect(streams, request)
        return _json(self._v2_body(result.text, result.last))

    async def v2_generate_stream(self, request: Request, ticket: Ticket) -> Response:
        streams = await self._submit(await self._v2_parse(request, ticket))
        outcome = StreamOutcome()
        return self._streamed(self._v2_events(streams[0], outcome), streams, outcome)

    async def _v2_events(self, stream: GenerationStream, outcome: StreamOutcome
                         ) -> AsyncIterator[bytes]:
        async for chunk in stream.chunks():
            if _failed(chunk):
                outcome.fail(ChunkFailed(chunk).status_code)
                yield api.sse({"error": chunk.error})
                break
            yield api.sse(self._v2_body(chunk.text, chunk))

    def _v2_body(self, text: str, chunk: Chunk) -> dict:
        body: dict[str, Any] = {"model_name": self.model.name, "model_version": "1",
                                "text_output": text}
        if chunk.finish_reason is not None:
            body["finish_reason"] = chunk.finish_reason
            body["usage"] = api.usage(chunk.prompt_tokens, chunk.completion_tokens)
        return body


@dataclasses.dataclass
class Collected:
    """One sequence's whole answer: its text, tokens, logprobs and last chunk."""

    text: str
    token_ids: list[int]
    logprobs: list | None
    last: Chunk


async def _collect_one(stream: GenerationStream) -> Collected:
    pieces: list[str] = []
    token_ids: list[int] = []
    logprobs: list | None = None
    async for chunk in stream.chunks():
        if _failed(chunk):
            raise ChunkFailed(chunk)
        pieces.append(chunk.text)
        token_ids.extend(chunk.token_ids)
        if chunk.logprobs is not None:
            logprobs = (logprobs or []) + list(chunk.logprobs)
        last = chunk
    return Collected("".join(pieces), token_ids, logprobs, last)


async def _collect(streams: list[GenerationStream], request: Request) -> list[Collected]:
    """The whole answers of a non-streamed request; its sequences are cancelled if the client
    disconnects while it waits, or when one of them fails."""
    async def cancel_on_disconnect() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        for stream in streams:
            stream.cancel()

    watcher = asyncio.ensure_future(cancel_on_disconnect())
    try:
        if len(streams) == 1:
            return [await _collect_one(streams[0])]
        return list(await asyncio.gather(*(_collect_one(s) for s in streams)))
    finally:
        watcher.cancel()
        for stream in streams:
            stream.cancel()  # a no-op for those that finished


async def _merged(streams: list[GenerationStream]) -> AsyncIterator[tuple[int, Chunk]]:
    """(choice index, chunk) of every stream, in the order they arrive."""
    if len(streams) == 1:
        async for chunk in streams[0].chunks():
            yield 0, chunk
        return
    queue: asyncio.Queue[tuple[int, Chunk | None]] = asyncio.Queue()

    async def pump(index: int, stream: GenerationStream) -> None:
        try:
            async for chunk in stream.chunks():
                queue.put_nowait((index, chunk))
        finally:
            queue.put_nowait((index, None))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        open_streams = len(streams)
        while open_streams:
            index, chunk = await queue.get()
            if chunk is None:
                open_streams -= 1
            else:
                yield index, chunk
    finally:
        for task in tasks:
            task.cancel()


def _json(doc, status: int = 200) -> Response:
    return Response(orjson.dumps(doc), status, media_type=JSON)


def _openai_error(exc: BaseException) -> Response:
    status, headers, body = api.openai_error(exc)
    return Response(orjson.dumps(body), status, headers=headers, media_type=JSON)

