"""The controller's ``/docs`` page without a CDN: Swagger UI served from a local package.

FastAPI's default ``/docs`` page loads Swagger UI's JavaScript and CSS from a CDN, so it is blank
on a machine without internet access. The ``swagger-ui-bundle`` package (Apache-2.0; installed
with ``kvcore[controller]``) ships those files; :func:`install_docs` serves them under
``/docs/assets`` and points ``/docs`` at them. Without the package, ``/docs`` keeps FastAPI's CDN
page.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

ASSETS = "/docs/assets"


def swagger_ui_dir() -> Path | None:
    """The directory of Swagger UI's files from ``swagger-ui-bundle``, or None if not installed."""
    try:
        import swagger_ui_bundle
    except ImportError:
        return None
    path = Path(swagger_ui_bundle.swagger_ui_path)
    return path if (path / "swagger-ui-bundle.js").is_file() else None


def docs_url() -> str | None:
    """What to pass as ``FastAPI(docs_url=...)``: None when :func:`install_docs` will serve it."""
    return None if swagger_ui_dir() is not None else "/docs"


def install_docs(app: FastAPI) -> bool:
    """Serve ``/docs`` from local Swagger UI assets; False (nothing done) without the package."""
    assets = swagger_ui_dir()
    if assets is None or app.docs_url is not None:
        return False
    app.mount(ASSETS, StaticFiles(directory=assets), name="swagger-ui-assets")
    redirect = "/docs/oauth2-redirect"

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json", title=f"{app.title} - API",
            swagger_js_url=f"{ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{ASSETS}/favicon-32x32.png",
            oauth2_redirect_url=redirect)

    @app.get(redirect, include_in_schema=False)
    async def swagger_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    return True
