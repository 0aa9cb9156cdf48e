"""/docs and /redoc served by the service itself, with no request to any other host.

FastAPI's default pages load Swagger UI and ReDoc from a CDN (and ReDoc a Google font, and
both a favicon from fastapi.tiangolo.com): blank pages offline, and every reader's browser
announced to third parties. Here the assets come from the pinned ``fastapi-offline``
package (Swagger UI 5.32.6, Apache-2.0; ReDoc 2.5.3, MIT; the package itself MIT), served
under /docs-assets, through FastAPI's documented self-hosting route
(``docs_url=None`` plus ``get_swagger_ui_html``/``get_redoc_html`` with local URLs).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.docs import (
    get_redoc_html,
    get_swagger_ui_html,
    get_swagger_ui_oauth2_redirect_html,
)
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

DOCS_URL = "/docs"
REDOC_URL = "/redoc"
ASSETS_URL = "/docs-assets"
OAUTH2_REDIRECT_URL = "/docs/oauth2-redirect"
# Swagger UI shows a badge fetched from validator.swagger.io for specs not on localhost:
# switched off, so a served /docs fetches nothing from outside either.
SWAGGER_UI_PARAMETERS: dict[str, Any] = {"validatorUrl": None}
# And a browser is told to fetch nothing from anywhere else: ReDoc 2.5.3 always shows a
# "by Redocly" logo from cdn.redoc.ly, with no option to turn it off; this policy stops
# that request in the browser (the link text stays). The pages' own start-up scripts are
# inline, hence 'unsafe-inline'; ReDoc runs its search in a blob: worker.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data: blob:; font-src 'self' data:; connect-src 'self'; "
    "worker-src 'self' blob:; frame-ancestors 'self'; base-uri 'self'; form-action 'self'"
)


def _local_only(page: HTMLResponse) -> HTMLResponse:
    page.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    return page


def assets_dir() -> Path:
    """The vendored Swagger UI and ReDoc files (swagger-ui-bundle.js, swagger-ui.css,
    redoc.standalone.js, favicon.png)."""
    import fastapi_offline

    return Path(fastapi_offline.__file__).resolve().parent / "static"


def app_docs_settings() -> dict[str, Any]:
    """FastAPI(...) arguments that switch off its CDN-based pages (``install_docs`` adds ours)."""
    return {"docs_url": None, "redoc_url": None, "swagger_ui_oauth2_redirect_url": None,
            "swagger_ui_parameters": SWAGGER_UI_PARAMETERS}


def install_docs(app: FastAPI) -> None:
    """Add /docs, /redoc and their assets to an app built with ``app_docs_settings()``."""
    app.mount(ASSETS_URL, StaticFiles(directory=assets_dir()), name="docs-assets")
    openapi_url = app.openapi_url or "/openapi.json"

    @app.get(DOCS_URL, include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return _local_only(get_swagger_ui_html(
            openapi_url=f"{root}{openapi_url}",
            title=f"{app.title} - Swagger UI",
            oauth2_redirect_url=f"{root}{OAUTH2_REDIRECT_URL}",
            swagger_js_url=f"{root}{ASSETS_URL}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{ASSETS_URL}/swagger-ui.css",
            swagger_favicon_url=f"{root}{ASSETS_URL}/favicon.png",
            swagger_ui_parameters=SWAGGER_UI_PARAMETERS,
        ))

    @app.get(OAUTH2_REDIRECT_URL, include_in_schema=False)
    async def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get(REDOC_URL, include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return _local_only(get_redoc_html(
            openapi_url=f"{root}{openapi_url}",
            title=f"{app.title} - ReDoc",
            redoc_js_url=f"{root}{ASSETS_URL}/redoc.standalone.js",
            redoc_favicon_url=f"{root}{ASSETS_URL}/favicon.png",
            with_google_fonts=False,
        ))
