"""The ``fewshot.request`` span of each HTTP request (:mod:`fewshot_service.tracing`): outermost
middleware, so the access log line and every child span (decode, queue_wait, inference, registry)
run inside it; a W3C ``traceparent`` header makes it the caller's child. A pass-through while
tracing is off."""

from __future__ import annotations

from urllib.parse import parse_qs

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ... import tracing
from .access_log import ROUTE_NOTE


def _namespace(scope: Scope) -> str | None:
    values = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("namespace")
    return values[0] if values else None


class RequestSpans:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not tracing.enabled():
            await self.app(scope, receive, send)
            return
        headers = ((k.decode("latin-1"), v.decode("latin-1")) for k, v in scope.get("headers", ()))
        attributes = {"http.request.method": scope["method"], "fewshot.transport": "http"}
        namespace = _namespace(scope)
        if namespace is not None:
            attributes["fewshot.namespace"] = namespace
        status = 500  # what the client gets if the app dies before answering

        async def send_noting_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        # The route template is known once routed; the span starts under the raw path's name.
        with tracing.request_span("unmatched", headers, attributes):
            try:
                await self.app(scope, receive, send_noting_status)
            finally:
                note = scope.get(ROUTE_NOTE)
                route = note.get("route") if isinstance(note, dict) else None
                tracing.set_attributes(
                    **{"fewshot.route": route or "unmatched", "http.route": route or "unmatched"}
                )
                tracing.end_request(status, failed=status >= 500)
