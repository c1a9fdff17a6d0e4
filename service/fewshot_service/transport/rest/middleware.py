"""ASGI middleware of the REST app: raw-path routing for labels, the body size limit, and the
response counter for /metrics."""

from __future__ import annotations

from prometheus_client import Counter
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .http_errors import error_response

CLASSES_PREFIX = "/v1/classes/"
NAMESPACES_PREFIX = "/v1/namespaces/"
MODELS_PREFIX = "/v1/models/"

HTTP_RESPONSES = Counter(
    "fewshot_http_responses_total", "HTTP responses by method and status code.", ["method", "status"]
)


class RawClassPath:
    """Route ``/v1/classes/...``, ``/v1/namespaces/...`` and ``/v1/models/...`` on the raw path,
    so ``%2F`` (or a decoded newline) inside a label, namespace or model id is not a separator.

    Handlers then percent-decode the label themselves (once).
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(
            (CLASSES_PREFIX, NAMESPACES_PREFIX, MODELS_PREFIX)
        ):
            raw = scope.get("raw_path")
            if raw:
                scope = dict(scope, path=raw.decode("latin-1"))
        await self.app(scope, receive, send)


class _BodyTooLarge(Exception):
    pass


class BodyLimit:
    """413 for a request body over ``max_bytes``: by its Content-Length, or while it streams in."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(send, f"request body of {int(declared)} bytes")
            return
        received = 0
        exceeded = False
        started = False

        async def counting_receive() -> Message:
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    exceeded = True
                    raise _BodyTooLarge()
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if exceeded:
                return  # the app's answer to a truncated body; ours follows
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except _BodyTooLarge:
            pass
        if exceeded and not started:
            await self._refuse(send, f"request body of more than {received} bytes")

    async def _refuse(self, send: Send, what: str) -> None:
        response = error_response(413, "too_large", f"{what} exceeds the limit of {self.max_bytes} bytes")
        await response({"type": "http"}, _no_receive, send)


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}


class CountResponses:
    """``fewshot_http_responses_total{method, status}`` for /metrics."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                HTTP_RESPONSES.labels(scope["method"], str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)
