"""The web playground: static files under ``/ui/`` (plain HTML/JS/CSS in ``rest/static/``,
served by this server, no CDN), and ``/`` redirecting there. The page calls the public REST API
with same-origin relative URLs, like any other client."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles

UI_DIR = Path(__file__).resolve().parent / "static"
UI_PREFIX = "/ui"  # its Content-Security-Policy: security_headers.UI_CSP


def install(app: FastAPI) -> None:
    app.mount(UI_PREFIX, StaticFiles(directory=UI_DIR, html=True), name="ui")

    @app.get("/", include_in_schema=False)
    def root() -> RedirectResponse:
        return RedirectResponse("ui/")  # relative: also right behind a proxy's path prefix
