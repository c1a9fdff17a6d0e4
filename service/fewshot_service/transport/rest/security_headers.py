"""Browser hardening headers on every HTTP response (errors and refusals included).

* ``X-Content-Type-Options: nosniff``: a JSON error that quotes the caller's input is never
  sniffed into HTML or script.
* No framing, anywhere: ``X-Frame-Options: DENY`` and CSP ``frame-ancestors 'none'``. The
  playground deletes with a click; a page on another origin must not frame it (clickjacking).
* ``Referrer-Policy: no-referrer``: the playground's URLs (namespace, labels) stay here.
* The playground (``/ui/``) gets a full Content-Security-Policy: its own script and style only,
  images from ``blob:`` URLs (the example images it fetches with the API key, which an
  ``<img src>`` could not send, and its previews), requests to this server.
  Swagger UI and ReDoc (``/docs``, ``/redoc``) start from an inline script of fastapi-offline's
  pages, so they get only the framing rule; the API's own answers (JSON, metrics) load nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

UI_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; "
    "media-src 'self' blob:; connect-src 'self'; form-action 'self'; base-uri 'none'; "
    "frame-ancestors 'none'"
)
DOCS_CSP = "frame-ancestors 'none'"
API_CSP = "default-src 'none'; frame-ancestors 'none'"

COMMON_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}


class SecurityHeaders:
    """Adds :data:`COMMON_HEADERS` and the CSP for the path (``ui_prefix``: :data:`UI_CSP`;
    ``docs_paths``, each a path or a prefix ending in ``/``: :data:`DOCS_CSP`; else :data:`API_CSP`)."""

    def __init__(self, app: ASGIApp, ui_prefix: str, docs_paths: Sequence[str]) -> None:
        self.app = app
        self.ui_prefix = ui_prefix
        self.docs_paths = tuple(docs_paths)

    def _csp(self, path: str) -> str:
        if path == self.ui_prefix or path.startswith(self.ui_prefix + "/"):
            return UI_CSP
        for docs in self.docs_paths:
            if path == docs or (docs.endswith("/") and path.startswith(docs)):
                return DOCS_CSP
        return API_CSP

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        csp = self._csp(scope["path"])

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in COMMON_HEADERS.items():
                    headers[name] = value
                headers["Content-Security-Policy"] = csp
            await send(message)

        await self.app(scope, receive, send_with_headers)
