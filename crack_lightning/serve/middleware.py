"""The server's ASGI middleware (body size, API key) and its one error body shape."""
from __future__ import annotations

import hmac

from fastapi.responses import JSONResponse

from crack_lightning.serve.batcher import API_KEY_HEADER


def _error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class BodyLimit:
    """ASGI middleware: 413 for a request body over ``max_bytes``, announced or streamed."""

    FLAG = "crack_lightning.body_too_large"

    class _TooLarge(Exception):
        pass

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        message = f"upload larger than the limit of {self.max_bytes / 1e6:g} MB"
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await _error(413, message)(scope, receive, send)
        received, started = 0, False

        async def limited_receive():
            nonlocal received
            msg = await receive()
            if msg["type"] == "http.request":
                received += len(msg.get("body", b""))
                if received > self.max_bytes:
                    scope[BodyLimit.FLAG] = True  # parsers may wrap the exception: the endpoint checks this
                    raise BodyLimit._TooLarge
            return msg

        async def tracking_send(msg):
            nonlocal started
            started = started or msg["type"] == "http.response.start"
            await send(msg)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyLimit._TooLarge:
            if not started:
                await _error(413, message)(scope, receive, send)


class ApiKey:
    """Every API request (``/v1/*``, ``/healthz``) carries the key in its ``X-API-Key`` header: compared as the
    bytes sent, in constant time (any byte is a wrong key, never an error). A plain ASGI middleware, as
    :class:`BodyLimit`: Starlette's ``http`` middleware hides a client's disconnect from the endpoint."""

    def __init__(self, app, key: str):
        self.app, self.key = app, key.encode("utf-8")
        self.header = API_KEY_HEADER.lower().encode("latin-1")

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        if scope["type"] == "http" and (path == "/healthz" or path.startswith("/v1/")):
            given = next((v for k, v in scope["headers"] if k == self.header), b"")
            if not hmac.compare_digest(given, self.key):
                await _error(401, f"missing or wrong {API_KEY_HEADER} header")(scope, receive, send)
                return
        await self.app(scope, receive, send)
