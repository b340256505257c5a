"""vLLM's dynamic LoRA endpoints: `POST /v1/load_lora_adapter {lora_name, lora_path}` and
`POST /v1/unload_lora_adapter {lora_name}`, under /v1 so behind the runtime's bearer auth.
Errors are OpenAI error bodies naming the field (`param`); loading runs in a worker thread."""

from __future__ import annotations

import asyncio
import logging

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from kubemaas_runtime.errors import InvalidInput, ModelNotReady, RuntimeServeError
from kubemaas_runtime.generation import openai_api as api

MAX_BODY = 64 * 1024
log = logging.getLogger("kubemaas_runtime")


class AdapterRoutes:
    def __init__(self, model, check_ready) -> None:
        self.model = model  # its `adapters` (AdapterRegistry or None) is set when it loads
        self.check_ready = check_ready

    def routes(self) -> list[Route]:
        return [Route("/v1/load_lora_adapter", self.load, methods=["POST"]),
                Route("/v1/unload_lora_adapter", self.unload, methods=["POST"])]

    async def _body(self, request: Request) -> dict:
        self.check_ready()
        registry = getattr(self.model, "adapters", None)
        if registry is None:
            raise ModelNotReady("LoRA adapters are off on this server (--max-loras 0)")
        body = b""
        async for part in request.stream():
            body += part
            if len(body) > MAX_BODY:
                raise InvalidInput(f"request body exceeds {MAX_BODY} bytes")
        return api.parse_json_object(body)

    async def load(self, request: Request) -> Response:
        try:
            doc = await self._body(request)
            adapter = await asyncio.to_thread(self.model.adapters.load, doc.get("lora_name"),
                                              doc.get("lora_path"))
        except Exception as exc:  # noqa: BLE001 - every failure is an OpenAI error body
            return _error(exc)
        return _text(f"Success: LoRA adapter '{adapter.name}' added successfully.")

    async def unload(self, request: Request) -> Response:
        try:
            doc = await self._body(request)
            name = doc.get("lora_name")
            await asyncio.to_thread(self.model.adapters.unload, name)
        except Exception as exc:  # noqa: BLE001 - every failure is an OpenAI error body
            return _error(exc)
        return _text(f"Success: LoRA adapter '{name}' removed successfully.")


def _text(message: str) -> Response:
    return Response(message, 200, media_type="text/plain")


def _error(exc: BaseException) -> Response:
    if not isinstance(exc, RuntimeServeError):
        log.exception("adapter request failed", exc_info=exc)
    status, headers, body = api.openai_error(exc)
    return Response(orjson.dumps(body), status, headers=headers, media_type="application/json")
