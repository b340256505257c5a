"""The OpenAI API's request fields and response shapes (pure: no HTTP, no model).

Requests are checked field by field before anything is tokenized or queued; a bad one is an
`InvalidParameter` naming the field, answered as OpenAI does:
`{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import dataclasses
import secrets
import time
from collections.abc import Callable, Sequence
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
UNSUPPORTED = ("tools", "functions", "tool_choice", "logit_bias", "echo", "suffix", "best_of",
               "audio", "prediction")
PENALTIES = ("presence_penalty", "frequency_penalty")
MAX_N = 16  # choices in one request: n sequences in the engine
MAX_TOP_LOGPROBS = 20  # as OpenAI's chat API (and vLLM's default max_logprobs)
# JSON schemas are compiled by the engine (vLLM: xgrammar): bounded like a prompt.
MAX_SCHEMA_BYTES = 64 * 1024


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
    n: int = 1  # choices: the front runs n sequences (seeds seed, seed+1, ...) and merges them
    top_k: int = 0  # vLLM's extension; 0 (or -1): off
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None  # None: off; k: the chosen token's logprob and the top k
    json_schema: str | None = None  # response_format json_object / json_schema, as text
    # (engine feature, the request field that needs it): checked against Engine.features
    needs: tuple[tuple[str, str], ...] = ()

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


def resolve_model(model: Any, served: str) -> str:
    """The served model a request's `model` names: 400 when missing, 404 when unknown."""
    if not isinstance(model, str) or not model:
        raise InvalidParameter("model", "'model' is required: the name of a served model")
    if model != served:
        raise ModelNotFound(model)
    return model


def _response_format(doc: dict[str, Any]) -> str | None:
    """`response_format` as a JSON schema text (None: free text)."""
    value = doc.get("response_format")
    if value is None:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        raise InvalidParameter("response_format", "'response_format' must be an object with a "
                                                  "'type': text, json_object or json_schema")
    kind = value["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return '{"type": "object"}'
    if kind != "json_schema":
        raise InvalidParameter("response_format", f"'response_format.type' must be text, "
                                                  f"json_object or json_schema, got {kind!r}")
    spec = value.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
        raise InvalidParameter("response_format", "'response_format.json_schema.schema' must be "
                                                  "a JSON schema object")
    text = orjson.dumps(spec["schema"]).decode()
    if len(text) > MAX_SCHEMA_BYTES:
        raise InvalidParameter("response_format", f"the JSON schema has {len(text)} bytes, "
                                                  f"more than the limit of {MAX_SCHEMA_BYTES}")
    return text


def _logprobs(doc: dict[str, Any], chat: bool) -> tuple[int | None, str]:
    """(top k, or None when off; the field that asked). Chat: `logprobs` a boolean and
    `top_logprobs` 0..20; completions: `logprobs` an integer 0..20."""
    value = doc.get("logprobs")
    if chat:
        if value is not None and not isinstance(value, bool):
            raise InvalidParameter("logprobs", "'logprobs' must be a boolean")
        top = _integer(doc, "top_logprobs")
        if top is not None and not 0 <= top <= MAX_TOP_LOGPROBS:
            raise InvalidParameter("top_logprobs", f"'top_logprobs' must be in [0, "
                                                   f"{MAX_TOP_LOGPROBS}], got {top}")
        if top is not None and not value:
            raise InvalidParameter("top_logprobs", "'top_logprobs' needs 'logprobs': true")
        return (top or 0, "logprobs") if value else (None, "logprobs")
    if value is None:
        return None, "logprobs"
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidParameter("logprobs", "'logprobs' must be an integer (the number of most "
                                           "likely tokens to return)")
    if not 0 <= value <= MAX_TOP_LOGPROBS:
        raise InvalidParameter("logprobs", f"'logprobs' must be in [0, {MAX_TOP_LOGPROBS}], "
                                           f"got {value}")
    return value, "logprobs"


def _common(doc: dict[str, Any], served: str, chat: bool) -> dict[str, Any]:
    model = resolve_model(doc.get("model"), served)
    for name in UNSUPPORTED:
        if doc.get(name) not in (None, False, [], {}, 0):
            raise InvalidParameter(name, f"'{name}' is not supported by this server")
    needs: list[tuple[str, str]] = []
    penalties = {name: _number(doc, name, 0.0, -2.0, 2.0) for name in PENALTIES}
    needs += [("penalties", name) for name, value in penalties.items() if value != 0.0]
    n = _integer(doc, "n")
    if n is not None and not 1 <= n <= MAX_N:
        raise InvalidParameter("n", f"'n' must be in [1, {MAX_N}], got {n}")
    top_k = _integer(doc, "top_k")
    if top_k is not None and top_k < -1:
        raise InvalidParameter("top_k", f"'top_k' must be -1 or 0 (off) or at least 1, "
                                        f"got {top_k}")
    top_k = max(top_k or 0, 0)
    if top_k:
        needs.append(("top_k", "top_k"))
    logprobs, logprobs_field = _logprobs(doc, chat)
    if logprobs is not None:
        needs.append(("logprobs", logprobs_field))
    json_schema = _response_format(doc)
    if json_schema is not None:
        needs.append(("json_schema", "response_format"))
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
            "stream": stream, "include_usage": include_usage, "n": n or 1, "top_k": top_k,
            "logprobs": logprobs, "json_schema": json_schema, "needs": tuple(needs), **penalties}


def check_features(request: GenerationRequest, features: frozenset[str], engine: str) -> None:
    """400 naming the first field that needs a feature this engine does not honour."""
    for feature, field in request.needs:
        if feature not in features:
            raise InvalidParameter(field, f"'{field}' is not supported by the {engine} engine "
                                          f"(it honours: {', '.join(sorted(features)) or 'none'}"
                                          f" of the optional sampling features)")


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


def parse_chat_request(doc: dict[str, Any], served: str) -> GenerationRequest:
    common = _common(doc, served, chat=True)
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


def parse_completion_request(doc: dict[str, Any], served: str) -> GenerationRequest:
    common = _common(doc, served, chat=False)
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


# One token's logprobs as an engine gives them (engine_api.Chunk.logprobs): the chosen token's
# logprob and the top k as (token id, logprob), most likely first.
TokenLogprobs = tuple[float, tuple[tuple[int, float], ...]]


def _token_entry(text: str, logprob: float) -> dict[str, Any]:
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def chat_logprobs(token_ids: Sequence[int], entries: Sequence[TokenLogprobs],
                  token_text: Callable[[int], str]) -> dict[str, Any]:
    """OpenAI's chat `logprobs`: {"content": [{token, logprob, bytes, top_logprobs}]}."""
    content = []
    for token, (logprob, top) in zip(token_ids, entries):
        entry = _token_entry(token_text(token), logprob)
        entry["top_logprobs"] = [_token_entry(token_text(t), lp) for t, lp in top]
        content.append(entry)
    return {"content": content}


def completion_logprobs(token_ids: Sequence[int], entries: Sequence[TokenLogprobs],
                        token_text: Callable[[int], str], offset: int) -> dict[str, Any]:
    """The completions API's `logprobs`: tokens, token_logprobs, top_logprobs (one
    {token: logprob} per position) and text_offset (from `offset`, in characters)."""
    tokens, chosen, tops, offsets = [], [], [], []
    for token, (logprob, top) in zip(token_ids, entries):
        text = token_text(token)
        tokens.append(text)
        chosen.append(logprob)
        tops.append({token_text(t): lp for t, lp in top})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": chosen, "top_logprobs": tops,
            "text_offset": offsets}


def choice_body(chat: bool, index: int, text: str, finish: str | None,
                logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": index, "finish_reason": finish, "logprobs": logprobs}
    if chat:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    return choice


def completion_body(chat: bool, rid: str, model: str, choices: list[dict[str, Any]],
                    prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {"id": rid, "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": model, "choices": choices,
            "usage": usage(prompt_tokens, completion_tokens)}


def chunk_body(chat: bool, rid: str, model: str, created: int, text: str | None,
               finish: str | None, *, first: bool = False, with_usage: bool = False,
               index: int = 0, logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": index, "finish_reason": finish, "logprobs": logprobs}
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
