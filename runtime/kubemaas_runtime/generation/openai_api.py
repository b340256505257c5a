"""The OpenAI API's request fields and response shapes (pure: no HTTP, no model).

Requests are checked field by field before anything is tokenized or queued; a bad one is an
`InvalidParameter` naming the field, answered as OpenAI does:
`{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import dataclasses
import secrets
import time
from typing import Any

import orjson

from kubemaas_runtime.errors import InvalidInput, ModelNotFound, RuntimeServeError
from kubemaas_runtime.generation.causal_lm import CHAT_ROLES

MAX_MESSAGES = 1024
MAX_STOP_STRINGS = 4
MAX_STOP_LENGTH = 256
# A prompt may have at most this many characters per context token (checked before
# tokenizing, so a huge string costs nothing); no tokenizer's tokens are longer on average.
MAX_CHARS_PER_TOKEN = 32
# Fields of OpenAI's API this server does not implement: refused when set, never ignored.
UNSUPPORTED = ("logprobs", "top_logprobs", "tools", "functions", "tool_choice", "logit_bias",
               "response_format", "echo", "suffix", "best_of", "audio", "prediction")
PENALTIES = ("presence_penalty", "frequency_penalty")


class InvalidParameter(InvalidInput):
    def __init__(self, param: str | None, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code


@dataclasses.dataclass(frozen=True)
class GenerationRequest:
    """One parsed request: either `messages` (chat) or `prompt` (text or token ids)."""

    model: str
    messages: list[dict[str, str]] | None
    prompt: str | list[int] | None
    max_tokens: int | None
    temperature: float
    top_p: float
    seed: int | None
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens whatever the model says

    @property
    def prompt_chars(self) -> int:
        if self.messages is not None:
            return sum(len(m["content"]) for m in self.messages)
        return len(self.prompt) if isinstance(self.prompt, str) else 0


def parse_json_object(body: bytes) -> dict[str, Any]:
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidParameter(None, f"the request body is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise InvalidParameter(None, "the request body must be a JSON object")
    return doc


def _number(doc, name, default, low, high, *, low_open=False) -> float:
    value = doc.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidParameter(name, f"'{name}' must be a number")
    if value < low or value > high or (low_open and value == low):
        bracket = "(" if low_open else "["
        raise InvalidParameter(name, f"'{name}' must be in {bracket}{low}, {high}], got {value}")
    return float(value)


def _integer(doc, name) -> int | None:
    value = doc.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidParameter(name, f"'{name}' must be an integer")
    return value


def _common(doc: dict[str, Any], served: str | frozenset[str]) -> dict[str, Any]:
    model = doc.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidParameter("model", "'model' is required: the name of a served model")
    if model not in ({served} if isinstance(served, str) else served):  # base or an adapter
        raise ModelNotFound(model)
    for name in UNSUPPORTED:
        if doc.get(name) not in (None, False, [], {}, 0):
            raise InvalidParameter(name, f"'{name}' is not supported by this server")
    for name in PENALTIES:
        if _number(doc, name, 0.0, -2.0, 2.0) != 0.0:
            raise InvalidParameter(name, f"'{name}' other than 0 is not supported by this server")
    n = _integer(doc, "n")
    if n not in (None, 1):
        raise InvalidParameter("n", f"only n=1 is supported, got {n}")
    max_tokens = None
    for name in ("max_completion_tokens", "max_tokens"):
        value = _integer(doc, name)
        if value is not None:
            if value < 1:
                raise InvalidParameter(name, f"'{name}' must be at least 1, got {value}")
            max_tokens = value if max_tokens is None else min(max_tokens, value)
    stop = doc.get("stop")
    if stop is None:
        stops: tuple[str, ...] = ()
    elif isinstance(stop, str):
        stops = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stops = tuple(stop)
    else:
        raise InvalidParameter("stop", "'stop' must be a string or a list of strings")
    if len(stops) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_LENGTH for s in stops):
        raise InvalidParameter("stop", f"'stop' takes at most {MAX_STOP_STRINGS} strings of at "
                                       f"most {MAX_STOP_LENGTH} characters")
    stream = doc.get("stream") or False
    if not isinstance(stream, bool):
        raise InvalidParameter("stream", "'stream' must be a boolean")
    options = doc.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise InvalidParameter("stream_options", "'stream_options' must be an object")
    include_usage = bool((options or {}).get("include_usage", False))
    if options and not stream:
        raise InvalidParameter("stream_options", "'stream_options' needs 'stream': true")
    ignore_eos = doc.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise InvalidParameter("ignore_eos", "'ignore_eos' must be a boolean")
    return {"model": model, "max_tokens": max_tokens, "ignore_eos": ignore_eos,
            "temperature": _number(doc, "temperature", 1.0, 0.0, 2.0),
            "top_p": _number(doc, "top_p", 1.0, 0.0, 1.0, low_open=True),
            "seed": _integer(doc, "seed"), "stop": tuple(s for s in stops if s),
            "stream": stream, "include_usage": include_usage}


def _message_content(message: dict[str, Any], index: int) -> str:
    content = message.get("content")
    where = f"messages[{index}].content"
    if isinstance(content, str):
        return content
    if content is None and message.get("role") == "assistant":
        return ""
    if isinstance(content, list):  # content parts: only text ones
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(
                    part.get("text"), str):
                raise InvalidParameter(where, f"'{where}' parts must be {{'type': 'text', "
                                              f"'text': ...}} (only text is supported)")
            texts.append(part["text"])
        return "".join(texts)
    raise InvalidParameter(where, f"'{where}' must be a string or a list of text parts")


def parse_chat_request(doc: dict[str, Any], served: str | frozenset[str]) -> GenerationRequest:
    common = _common(doc, served)
    messages = doc.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidParameter("messages", "'messages' must be a non-empty list")
    if len(messages) > MAX_MESSAGES:
        raise InvalidParameter("messages", f"'messages' has {len(messages)} entries, more than "
                                           f"the limit of {MAX_MESSAGES}")
    parsed = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise InvalidParameter(f"messages[{index}]", f"'messages[{index}]' must be an object")
        role = message.get("role")
        if role not in CHAT_ROLES:
            raise InvalidParameter(f"messages[{index}].role",
                                   f"'messages[{index}].role' must be one of "
                                   f"{', '.join(CHAT_ROLES)}, got {role!r}")
        parsed.append({"role": "system" if role == "developer" else role,
                       "content": _message_content(message, index)})
    return GenerationRequest(messages=parsed, prompt=None, **common)


def parse_completion_request(doc: dict[str, Any], served: str | frozenset[str]) -> GenerationRequest:
    common = _common(doc, served)
    prompt = doc.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, list):
        if not prompt or not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            raise InvalidParameter("prompt", "'prompt' must be a string, or one list of token "
                                             "ids (several prompts in one request are not "
                                             "supported)")
    elif not isinstance(prompt, str):
        raise InvalidParameter("prompt", "'prompt' must be a string or a list of token ids")
    return GenerationRequest(messages=None, prompt=prompt, **common)


def check_prompt_size(request: GenerationRequest, max_model_len: int) -> None:
    limit = MAX_CHARS_PER_TOKEN * max_model_len
    if request.prompt_chars > limit:
        param = "messages" if request.messages is not None else "prompt"
        raise InvalidParameter(param, f"the prompt has {request.prompt_chars} characters: more "
                                      f"than any prompt that fits this model's context of "
                                      f"{max_model_len} tokens ({limit} characters at most)",
                               "context_length_exceeded")


def resolve_max_tokens(request: GenerationRequest, prompt_tokens: int,
                       max_model_len: int) -> int:
    """max_tokens as given (or what the context leaves); 400 when the context cannot hold it."""
    if prompt_tokens + 1 > max_model_len:
        raise InvalidParameter(
            "messages" if request.messages is not None else "prompt",
            f"this model's maximum context length is {max_model_len} tokens, and the prompt "
            f"has {prompt_tokens} tokens: no room to generate", "context_length_exceeded")
    if request.max_tokens is None:
        return max_model_len - prompt_tokens
    if prompt_tokens + request.max_tokens > max_model_len:
        raise InvalidParameter(
            "max_tokens", f"this model's maximum context length is {max_model_len} tokens, "
                          f"but {prompt_tokens + request.max_tokens} were requested "
                          f"({prompt_tokens} in the prompt, {request.max_tokens} max_tokens)",
            "context_length_exceeded")
    return request.max_tokens


# -- responses ---------------------------------------------------------------------------
def new_id(kind: str) -> str:
    return f"{kind}-{secrets.token_hex(12)}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(chat: bool, rid: str, model: str, text: str, finish: str,
                    prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
    if chat:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    return {"id": rid, "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": model, "choices": [choice],
            "usage": usage(prompt_tokens, completion_tokens)}


def chunk_body(chat: bool, rid: str, model: str, created: int, text: str | None,
               finish: str | None, *, first: bool = False,
               with_usage: bool = False) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
    if chat:
        delta: dict[str, Any] = {"role": "assistant"} if first else {}
        if text is not None:
            delta["content"] = text
        choice["delta"] = delta
    else:
        choice["text"] = text or ""
    body = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": created, "model": model, "choices": [choice]}
    if with_usage:
        body["usage"] = None
    return body


def sse(doc: Any) -> bytes:
    return b"data: " + orjson.dumps(doc) + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


def openai_error(exc: BaseException) -> tuple[int, dict[str, str], dict[str, Any]]:
    """Status, headers and OpenAI's error body for any exception (the one mapping for /v1)."""
    if isinstance(exc, RuntimeServeError):
        status, headers, message = exc.status_code, exc.headers(), exc.message
    else:
        status, headers, message = 500, {}, f"internal error: {type(exc).__name__}: {exc}"
    kind = {400: "invalid_request_error", 404: "invalid_request_error",
            413: "invalid_request_error"}.get(status, "server_error")
    code = getattr(exc, "code", None) or {404: "model_not_found", 413: "request_too_large",
                                          503: "overloaded" if headers else "unavailable"}.get(status)
    return status, headers, {"error": {"message": message, "type": kind,
                                       "param": getattr(exc, "param", None), "code": code}}
