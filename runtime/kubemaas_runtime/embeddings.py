"""OpenAI's embeddings API for `feature-extraction` models: `POST /v1/embeddings`, and
`/v1/models` listing the encoder. Mounted by server.create_app.

A request goes the v2 infer route's way: `Admission.endpoint` (request metrics, the memory
ticket), `read_body` (size limit, deadline, budget), an in-flight slot, then the model's own
`DynamicBatcher`, so it shares forwards with v2 requests. Its inputs are tokenized here,
whole, so that usage counts every token and an input longer than the model reads is refused
rather than truncated; the batch receives token ids (text_models.TOKEN_IDS). Errors are
OpenAI's shape (generation/openai_api.openai_error). docs/runtime.md, "Embeddings".
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import logging
from typing import Any

import numpy as np
import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from kubemaas_runtime.admission import JSON_EXPANSION, ClientGone, Ticket
from kubemaas_runtime.errors import ModelNotFound, ModelNotReady, PayloadTooLarge, RuntimeServeError
from kubemaas_runtime.generation.openai_api import (
    MAX_CHARS_PER_TOKEN,
    InvalidParameter,
    openai_error,
    parse_json_object,
)
from kubemaas_runtime.models.text_models import TOKEN_IDS, FeatureExtractionModel
from kubemaas_runtime.protocol import Tensor

log = logging.getLogger("kubemaas_runtime")
JSON = "application/json"
ENCODING_FORMATS = ("float", "base64")


@dataclasses.dataclass(frozen=True)
class EmbeddingsLimits:
    max_inputs: int  # --max-batch-size: the rows of one v2 request
    max_input_tokens: int  # what the model reads (sentence-transformers' max_seq_length)
    max_string_bytes: int  # --max-string-bytes: one v2 BYTES element
    vocab_size: int
    dimension: int


@dataclasses.dataclass(frozen=True)
class EmbeddingsRequest:
    inputs: list[str | list[int]]  # each a text, or token ids used as given
    encoding_format: str


def parse_embeddings_request(doc: dict[str, Any], served: str,
                             limits: EmbeddingsLimits) -> EmbeddingsRequest:
    """Every field checked before anything is tokenized or queued; a 400 naming the field."""
    model = doc.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidParameter("model", "'model' is required: the name of a served model")
    if model != served:
        raise ModelNotFound(model)
    encoding = doc.get("encoding_format")
    if encoding is None:
        encoding = "float"
    if encoding not in ENCODING_FORMATS:
        raise InvalidParameter("encoding_format", f"'encoding_format' must be 'float' or "
                                                  f"'base64', got {encoding!r}")
    dimensions = doc.get("dimensions")
    if dimensions is not None:
        if isinstance(dimensions, bool) or not isinstance(dimensions, int):
            raise InvalidParameter("dimensions", "'dimensions' must be an integer")
        if dimensions != limits.dimension:
            raise InvalidParameter(
                "dimensions", f"'dimensions' {dimensions} is not supported: this model's "
                              f"embeddings have {limits.dimension} dimensions, and shortening "
                              f"them is not supported")
    user = doc.get("user")
    if user is not None and not isinstance(user, str):
        raise InvalidParameter("user", "'user' must be a string")
    return EmbeddingsRequest(_inputs(doc.get("input"), limits), encoding)


def _inputs(value: Any, limits: EmbeddingsLimits) -> list[str | list[int]]:
    shape = ("'input' must be a string, a list of strings, a list of token ids, or a list of "
             "lists of token ids")
    if isinstance(value, list) and not value:
        raise InvalidParameter("input", "'input' is an empty list")
    if isinstance(value, str) or _is_token_ids(value):
        items = [value]
    elif isinstance(value, list):
        items = value
    else:
        raise InvalidParameter("input", shape)
    if len(items) > limits.max_inputs:
        raise InvalidParameter("input", f"'input' has {len(items)} entries, more than the limit "
                                        f"of {limits.max_inputs} (--max-batch-size)")
    max_chars = MAX_CHARS_PER_TOKEN * limits.max_input_tokens
    for index, item in enumerate(items):
        where = f"input[{index}]"
        if isinstance(item, str):
            if not item:
                raise InvalidParameter("input", f"'{where}' is an empty string")
            if len(item) > max_chars or len(item.encode("utf-8", "surrogatepass")) > (
                    limits.max_string_bytes):
                raise InvalidParameter(
                    "input", f"'{where}' has {len(item)} characters: more than any input of "
                             f"at most {limits.max_input_tokens} tokens this model reads, or "
                             f"past --max-string-bytes {limits.max_string_bytes}",
                    "context_length_exceeded")
        elif _is_token_ids(item):
            if not item:
                raise InvalidParameter("input", f"'{where}' is an empty list of token ids")
            if len(item) > limits.max_input_tokens:
                raise _too_long(where, len(item), limits)
            if any(t < 0 or t >= limits.vocab_size for t in item):
                raise InvalidParameter("input", f"'{where}': token ids must be in "
                                                f"[0, {limits.vocab_size})")
        else:
            raise InvalidParameter("input", f"'{where}' is neither a string nor a list of token "
                                            f"ids; {shape}")
    if len({type(item) for item in items}) > 1:
        raise InvalidParameter("input", "'input' mixes strings and token ids")
    return items


def _is_token_ids(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(t, int) and not isinstance(t, bool) for t in value)


def _too_long(where: str, tokens: int, limits: EmbeddingsLimits) -> InvalidParameter:
    return InvalidParameter(
        "input", f"'{where}' has {tokens} tokens, more than this model's maximum input length "
                 f"of {limits.max_input_tokens} tokens (inputs are refused, not truncated)",
        "context_length_exceeded")


def token_ids_tensor(rows: list[list[int]]) -> Tensor:
    data = np.empty(len(rows), dtype=object)
    for i, row in enumerate(rows):
        data[i] = row
    return Tensor(TOKEN_IDS, "INT64", (len(rows),), data)


def embeddings_body(model: str, embeddings: np.ndarray, encoding_format: str,
                    prompt_tokens: int) -> bytes:
    rows = embeddings.astype("<f4", copy=False)
    if encoding_format == "base64":  # little-endian float32 bytes, as OpenAI sends them
        data = [base64.b64encode(row.tobytes()).decode("ascii") for row in rows]
    else:
        data = list(rows)
    return orjson.dumps({
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(data)],
        "model": model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }, option=orjson.OPT_SERIALIZE_NUMPY)


def openai_response(exc: BaseException) -> Response:
    status, headers, body = openai_error(exc)
    return Response(orjson.dumps(body), status, headers=headers, media_type=JSON)


class EmbeddingsService:
    def __init__(self, state) -> None:
        self.state = state
        self.model: FeatureExtractionModel = state.model
        self.admission = state.admission

    def routes(self) -> list[Route]:
        return [
            Route("/v1/models", self.list_models),
            Route("/v1/models/{name}", self.get_model),
            Route("/v1/embeddings", self.admission.endpoint(self.embeddings), methods=["POST"]),
        ]

    def limits(self) -> EmbeddingsLimits:
        config = self.state.config
        return EmbeddingsLimits(
            max_inputs=config.max_batch_size, max_string_bytes=config.max_string_bytes,
            max_input_tokens=self.model.tokenizer.max_length,
            vocab_size=self.model.vocab_size, dimension=self.model.dimension)

    async def list_models(self, request: Request) -> Response:
        return Response(orjson.dumps({"object": "list", "data": [self._model_card()]}),
                        media_type=JSON)

    async def get_model(self, request: Request) -> Response:
        if request.path_params["name"] != self.model.name:
            return openai_response(ModelNotFound(request.path_params["name"]))
        return Response(orjson.dumps(self._model_card()), media_type=JSON)

    def _model_card(self) -> dict[str, Any]:
        card: dict[str, Any] = {"id": self.model.name, "object": "model", "created": 0,
                                "owned_by": "kubemaas"}
        if self.model.ready:
            card["max_model_len"] = self.model.tokenizer.max_length
        return card

    async def embeddings(self, request: Request, ticket: Ticket) -> Response:
        """Admission.endpoint counts and times it; errors answered in OpenAI's shape."""
        try:
            return await self._embed(request, ticket)
        except ClientGone:
            raise
        except Exception as exc:
            if not isinstance(exc, RuntimeServeError):
                log.exception("embeddings request failed")
            return openai_response(exc)

    async def _embed(self, request: Request, ticket: Ticket) -> Response:
        state = self.state
        if not state.can_infer:
            raise ModelNotReady(state.not_ready_reason())
        max_json = state.request_limits.max_json_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_json:
            raise _body_too_large(f"request body of {declared} bytes", max_json)
        body = await self.admission.read_body(request, ticket)
        if len(body) > max_json:
            raise _body_too_large("request body", max_json)
        limits = self.limits()
        with self.admission.in_flight():
            charge = len(body) * JSON_EXPANSION  # the parsed objects, as v2 charges them
            ticket.charge(charge)
            try:
                parsed = parse_embeddings_request(parse_json_object(bytes(body)),
                                                  self.model.name, limits)
            finally:
                ticket.refund(charge)
            del body
            rows = await self._token_ids(parsed.inputs, limits)
            (embedding,) = await state.batcher.submit({TOKEN_IDS: token_ids_tensor(rows)},
                                                      len(rows))
            return Response(embeddings_body(self.model.name, embedding.data,
                                            parsed.encoding_format, sum(map(len, rows))),
                            media_type=JSON)

    async def _token_ids(self, inputs: list[str | list[int]],
                         limits: EmbeddingsLimits) -> list[list[int]]:
        texts = [item for item in inputs if isinstance(item, str)]
        if not texts:
            return inputs  # type: ignore[return-value]  # all token ids (checked)
        loop = asyncio.get_running_loop()
        rows = await loop.run_in_executor(self.state.codec, self.model.tokenizer.token_ids,
                                          texts)
        for index, row in enumerate(rows):
            if len(row) > limits.max_input_tokens:
                raise _too_long(f"input[{index}]", len(row), limits)
        return rows


class InputTooLarge(PayloadTooLarge):
    param = "input"  # openai_error names it: the input is what makes a body this large


def _body_too_large(what: str, limit: int) -> InputTooLarge:
    return InputTooLarge(f"{what} exceeds the limit of {limit} bytes for a JSON request "
                         f"(--max-json-bytes): send fewer or shorter 'input' entries")


async def not_served(request: Request) -> Response:
    """/v1/embeddings on a server whose model is not a feature-extraction encoder."""
    return openai_response(_NotServed())


class _NotServed(RuntimeServeError):
    status_code = 404

    def __init__(self) -> None:
        super().__init__("/v1/embeddings is served only for feature-extraction models "
                         "(--format transformers --task feature-extraction); this server's "
                         "model is not one")
        self.code = "unsupported_endpoint"


def embeddings_routes(state) -> list[Route]:
    """The routes server.create_app mounts: the API for an encoder, else one clear 404."""
    if isinstance(state.model, FeatureExtractionModel):
        return EmbeddingsService(state).routes()
    return [Route("/v1/embeddings", not_served, methods=["POST"])]
