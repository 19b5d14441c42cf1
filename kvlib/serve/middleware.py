"""ASGI middleware: a bounded request body, and the request counter by route and status.

The body is read here, up to the limit, before any route sees it: a body over the limit
answers 400 in OpenAI's shape whether or not it declared a Content-Length (a chunked
upload cannot slip past). After the buffered body is replayed, `receive` is the server's
again, so routes still see the client's `http.disconnect`.
"""

from __future__ import annotations

import json

from kvlib.serve.errors import error_body

ROUTES = ("/v1/chat/completions", "/v1/models", "/v1/documents", "/healthz", "/metrics")


class Guard:
    def __init__(self, app, *, max_body_bytes: int, metrics):
        self.app, self.limit, self.metrics = app, max_body_bytes, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = scope["path"] if scope["path"] in ROUTES else "other"
        status = {"code": 500}

        async def counted_send(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            body = await self._read_body(scope, receive)
            if body is None:
                await self._too_large(counted_send)
                return
            await self.app(scope, self._replay(body, receive), counted_send)
        finally:
            self.metrics.requests.labels(route, str(status["code"])).inc()

    async def _read_body(self, scope, receive) -> bytes | None:
        """The whole body, or None once it passes the limit."""
        declared = dict(scope.get("headers", ())).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return None
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client left before sending it all
                return b""
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return None
            more = message.get("more_body", False)
        return b"".join(chunks)

    def _replay(self, body: bytes, receive):
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return replay

    async def _too_large(self, send) -> None:
        payload = json.dumps(error_body(400, f"request body too large: the limit is {self.limit} bytes",
                                        "request_too_large")).encode()
        await send({"type": "http.response.start", "status": 400,
                    "headers": [(b"content-type", b"application/json"), (b"connection", b"close"),
                                (b"content-length", str(len(payload)).encode())]})
        await send({"type": "http.response.body", "body": payload})
