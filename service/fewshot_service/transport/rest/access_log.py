"""One access-log line and the HTTP metrics per request, labelled by route template.

``fewshot_http_requests_total{method, route, status}`` and ``fewshot_http_request_seconds{method,
route}``: the route is the matched template (``/v1/classes/{label:path}``), never the raw path, so
the label set stays bounded. The log line (logger ``fewshot.access``) has the method, route,
status, milliseconds, the request id (the client's ``X-Request-ID`` when it is sane, else a new
one; sent back in the response header) and the API key's *name* when the auth layer put one in
``request.state.api_key_name`` -- never a key, a body or an image byte. Uvicorn's own access log
stays off (``app.py``).
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Sequence

from prometheus_client import Counter, Histogram
from starlette.datastructures import MutableHeaders
from starlette.routing import BaseRoute, Match, Mount
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ...core.metrics import LATENCY_BUCKETS

log = logging.getLogger("fewshot.access")

HTTP_REQUESTS = Counter(
    "fewshot_http_requests_total",
    "HTTP requests by method, route template and status code.",
    ["method", "route", "status"],
)
HTTP_SECONDS = Histogram(
    "fewshot_http_request_seconds",
    "HTTP request latency (first byte in to last byte out) by method and route template.",
    ["method", "route"],
    buckets=LATENCY_BUCKETS,
)

REQUEST_ID_HEADER = "X-Request-ID"
_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
_KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
UNMATCHED_ROUTE = "unmatched"  # any path no route serves: one label, whatever was asked
KEY_NAME_STATE = "api_key_name"  # request.state attribute the auth layer sets
ROUTE_NOTE = "fewshot.route"  # scope key: a dict shared by every copy of the scope downstream


def _mount_template(mounts: Sequence[BaseRoute], scope: Scope) -> str:
    """``/ui/{path}`` for a request a mount served (the router names only its own routes)."""
    for route in mounts:
        if isinstance(route, Mount) and route.matches(scope)[0] == Match.FULL:
            return f"{route.path}/{{path}}"
    return UNMATCHED_ROUTE


class NoteRoute:
    """Innermost middleware: after routing, notes the matched route's template (the router sets
    ``scope["route"]`` on the scope it was given, which may be a copy of the outer one)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self.app(scope, receive, send)
        finally:
            note, route = scope.get(ROUTE_NOTE), scope.get("route")
            if isinstance(note, dict) and isinstance(getattr(route, "path", None), str):
                note["route"] = route.path


def _request_id(scope: Scope) -> str:
    for name, value in scope.get("headers", []):
        if name == b"x-request-id":
            text = value.decode("latin-1")
            if _SANE_REQUEST_ID.fullmatch(text):
                return text
    return uuid.uuid4().hex[:16]


class AccessLog:
    """Outermost middleware: sees every request, including those refused before routing.

    The route template comes from :class:`NoteRoute` (which must sit innermost), or from the
    app's mounts (static files), else ``unmatched``."""

    def __init__(self, app: ASGIApp, routes: Sequence[BaseRoute]) -> None:
        self.app = app
        self.routes = routes  # the app's live route list (mounts added later count too)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = _request_id(scope)
        # Matched before the call: routing rewrites the scope (a mount's root_path) as it goes.
        mount = _mount_template(self.routes, scope)
        note: dict[str, str] = {}
        scope[ROUTE_NOTE] = note
        # One dict shared with every (shallow) copy of the scope downstream: request.state.
        state = scope.setdefault("state", {})
        state["request_id"] = request_id  # error bodies of server-side failures quote it
        status = 500  # what the client gets if the app dies before answering

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message).append(REQUEST_ID_HEADER, request_id)
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            seconds = time.perf_counter() - started
            route = note.get("route") or mount
            method = scope["method"] if scope["method"] in _KNOWN_METHODS else "other"
            HTTP_REQUESTS.labels(method, route, str(status)).inc()
            HTTP_SECONDS.labels(method, route).observe(seconds)
            log.info(
                "http method=%s route=%s status=%d ms=%.1f key=%s request_id=%s",
                method,
                route,
                status,
                seconds * 1000,
                state.get(KEY_NAME_STATE) or "-",
                request_id,
            )
