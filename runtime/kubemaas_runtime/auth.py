"""Optional bearer-token auth (--auth-token-file): an ASGI middleware in front of every route
under a protected prefix (model metadata and inference: /v2/models/..., and the OpenAI-style
/v1/...). Health, server metadata (/v2) and /metrics stay open for probes and Prometheus.

The token is compared in constant time (hmac.compare_digest), so the answer's timing says
nothing about how much of a guess was right.
"""

from __future__ import annotations

import hmac
from pathlib import Path

from kubemaas_runtime.errors import ModelLoadFailed, Unauthorized, error_response_parts

PROTECTED_PREFIXES = ("/v2/models/", "/v1/")
MAX_TOKEN_BYTES = 4096


class AuthTokenInvalid(ModelLoadFailed):
    reason = "AuthTokenInvalid"


def read_token_file(path: str) -> bytes:
    """The token in `path`, surrounding whitespace dropped; refused when empty or unreadable."""
    try:
        raw = Path(path).read_bytes()[:MAX_TOKEN_BYTES + 1]
    except OSError as exc:
        raise AuthTokenInvalid(f"cannot read --auth-token-file {path}: {exc.strerror}") from None
    token = raw.strip()
    if not token or len(token) > MAX_TOKEN_BYTES or any(b < 0x21 or b > 0x7E for b in token):
        raise AuthTokenInvalid(f"--auth-token-file {path} must hold one token of 1 to "
                               f"{MAX_TOKEN_BYTES} printable ASCII characters")
    return token


def is_protected(path: str) -> bool:
    return path.startswith(PROTECTED_PREFIXES) or path in ("/v1", "/v2/models")


class BearerAuth:
    """Refuses requests to protected paths whose `Authorization: Bearer <token>` is missing or
    wrong with 401 and the v2 error body."""

    def __init__(self, app, token: bytes) -> None:
        self.app = app
        self._expected = b"Bearer " + token

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and is_protected(scope["path"]):
            given = b""
            for name, value in scope["headers"]:
                if name == b"authorization":
                    given = value
                    break
            if not hmac.compare_digest(given, self._expected):
                reason = "missing bearer token" if not given else "wrong bearer token"
                await _send_error(send, Unauthorized(
                    f"{reason}: send 'Authorization: Bearer <token>'"))
                return
        await self.app(scope, receive, send)


async def _send_error(send, exc: Unauthorized) -> None:
    status, headers, body = error_response_parts(exc)
    raw_headers = [(b"content-type", b"application/json"),
                   (b"content-length", str(len(body)).encode())]
    raw_headers += [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body})
