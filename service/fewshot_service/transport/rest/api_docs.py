"""ReDoc at ``/redoc`` with every asset from this server, and the site's favicon.

fastapi-offline serves ReDoc's bundle locally, but the bundle itself draws a "by Redocly" logo
from ``cdn.redoc.ly``: a request to an outside host from a page that should work offline (and a
leak of who reads the docs). The bundle is served here with that one address pointed at a local
image; the text is patched once, in memory, so the package's file stays as installed.
"""

from __future__ import annotations

import functools
from pathlib import Path

import fastapi_offline
from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html
from fastapi.responses import FileResponse, HTMLResponse, Response

from .ui import UI_DIR

REDOC_ASSETS_URL = "/redoc-assets"  # not under fastapi-offline's mount: its StaticFiles would answer
REDOC_BUNDLE = Path(fastapi_offline.__file__).resolve().parent / "static" / "redoc.standalone.js"
REDOC_CDN_LOGO = "https://cdn.redoc.ly/redoc/logo-mini.svg"
FAVICON = UI_DIR / "favicon.ico"
REDOC_LOGO = UI_DIR / "redoc-logo.svg"


@functools.cache
def local_redoc_bundle(logo_url: str) -> bytes:
    """ReDoc's bundle with its CDN logo at ``logo_url``; ValueError when a new ReDoc release no
    longer holds that address (so the patch is revisited, not silently skipped)."""
    text = REDOC_BUNDLE.read_text(encoding="utf-8")
    if REDOC_CDN_LOGO not in text:
        raise ValueError(f"{REDOC_BUNDLE} no longer loads {REDOC_CDN_LOGO}: revisit api_docs.py")
    return text.replace(REDOC_CDN_LOGO, logo_url).encode("utf-8")


def install(app: FastAPI, redoc_url: str) -> None:
    """``redoc_url`` (ReDoc from :data:`REDOC_ASSETS_URL`) and ``/favicon.ico``."""

    @app.get(redoc_url, include_in_schema=False)
    def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")  # behind a proxy's path prefix, as fastapi-offline does
        return get_redoc_html(
            openapi_url=f"{root}{app.openapi_url}",
            title=f"{app.title} - ReDoc",
            redoc_js_url=f"{root}{REDOC_ASSETS_URL}/redoc.standalone.js",
            redoc_favicon_url=f"{root}/favicon.ico",
            with_google_fonts=False,
        )

    @app.get(f"{REDOC_ASSETS_URL}/redoc.standalone.js", include_in_schema=False)
    def redoc_bundle(request: Request) -> Response:
        root = request.scope.get("root_path", "")
        return Response(
            local_redoc_bundle(f"{root}{REDOC_ASSETS_URL}/logo.svg"), media_type="text/javascript"
        )

    @app.get(f"{REDOC_ASSETS_URL}/logo.svg", include_in_schema=False)
    def redoc_logo() -> FileResponse:
        return FileResponse(REDOC_LOGO, media_type="image/svg+xml")

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon() -> FileResponse:
        return FileResponse(FAVICON, media_type="image/x-icon")
