"""The REST transport (FastAPI): classes and their examples, classify, health and metrics.

One router per resource (``routes_*``), the core and the uploads as dependencies
(:mod:`.dependencies`), bodies in :mod:`.schemas`, and the error table in :mod:`.http_errors`.
Handlers only translate HTTP <-> :class:`FewShotCore` calls; the core checks every value.
"""

from __future__ import annotations

from collections.abc import Sequence

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline

from ... import __version__
from ...core.core import FewShotCore
from ...settings import DEFAULT_MAX_REQUEST_BYTES
from ..access import AccessControl
from . import (
    api_docs,
    routes_bulk,
    routes_classes,
    routes_classify,
    routes_embed,
    routes_health,
    routes_info,
    routes_models,
    routes_namespaces,
    routes_report,
    ui,
)
from .access_log import AccessLog, NoteRoute
from .http_errors import HTTP_STATUS, install_error_handlers
from .middleware import BodyLimit, CountResponses, RawClassPath
from .request_spans import RequestSpans
from .security import install_security
from .security_headers import SecurityHeaders

__all__ = ["HTTP_STATUS", "create_app"]

DOCS_URL, REDOC_URL, DOCS_ASSETS_URL = "/docs", "/redoc", "/docs-assets"


def create_app(
    core: FewShotCore,
    *,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    access: AccessControl | None = None,
    cors_origins: Sequence[str] = (),
    allowed_hosts: Sequence[str] = (),
) -> FastAPI:
    # /docs and /redoc with Swagger UI and ReDoc served from a package, not a CDN: they work offline.
    app = FastAPIOffline(
        docs_url=DOCS_URL,
        redoc_url=None,  # api_docs serves ReDoc: its bundle's logo comes from this server too
        static_url=DOCS_ASSETS_URL,
        title="fewshot",
        version=__version__,
        description="Few-shot image classification: define classes with a few examples each.",
    )
    app.state.core = core
    install_error_handlers(app)
    app.include_router(routes_classes.router)
    app.include_router(routes_bulk.router)
    app.include_router(routes_classify.router)
    app.include_router(routes_report.router)
    app.include_router(routes_namespaces.router)
    app.include_router(routes_models.router)
    app.include_router(routes_health.router)
    app.include_router(routes_embed.router)
    app.include_router(routes_info.router)
    ui.install(app)
    api_docs.install(app, REDOC_URL)
    install_security(app, access, cors_origins, allowed_hosts)  # API keys, Host and Origin rules
    # The last added wraps the others: a request meets CountResponses, then BodyLimit, then
    # RawClassPath, so even a refused body is counted and routing sees the raw path.
    app.add_middleware(NoteRoute)  # innermost: reads the route the router picked
    app.add_middleware(RawClassPath)
    app.add_middleware(BodyLimit, max_bytes=max_request_bytes)
    app.add_middleware(CountResponses)
    # On every answer, refusals included; Swagger UI and ReDoc keep their inline start-up script.
    docs_paths = [
        DOCS_URL,
        REDOC_URL,
        app.swagger_ui_oauth2_redirect_url or DOCS_URL,
        DOCS_ASSETS_URL + "/",
        api_docs.REDOC_ASSETS_URL + "/",
    ]
    app.add_middleware(SecurityHeaders, ui_prefix=ui.UI_PREFIX, docs_paths=docs_paths)
    app.add_middleware(AccessLog, routes=app.router.routes)  # logs even a refused body
    app.add_middleware(RequestSpans)  # outermost: the access log line runs inside the request's span
    return app
