"""The web dashboard at ``/`` and the API docs at ``/docs`` and ``/redoc``, served offline.

Everything a browser loads from these pages comes from this process: the dashboard's own
files and the vendored JavaScript libraries are package data under ``app/static/`` (served
at ``/static``; ``app/static/vendor/README.md`` names each library, its version, source and
licence). FastAPI's default docs pages load Swagger UI and ReDoc from a public CDN and show a
blank page without internet; :func:`install_dashboard` replaces them with the same pages built
by FastAPI's ``get_swagger_ui_html``/``get_redoc_html`` pointed at the vendored copies (the
"self-hosting JavaScript and CSS for docs" recipe of FastAPI's documentation), with the
favicon, Google Fonts and Swagger's online validator badge turned off or local.

None of these routes needs an API key: the pages hold no data. The dashboard asks for a key in
the browser, keeps it in ``sessionStorage`` and sends it as ``Authorization: Bearer`` on each
``/v1`` request it makes (docs/security.md, "Web dashboard").
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.openapi.docs import (
    get_redoc_html,
    get_swagger_ui_html,
    get_swagger_ui_oauth2_redirect_html,
)
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
STATIC_URL = "/static"
VENDOR_URL = f"{STATIC_URL}/vendor"

# The dashboard page may load scripts, styles and data from this origin only; it has no
# inline script or style (uPlot sets styles through the CSSOM, which CSP allows), and it may
# not be framed. Downloads are blob: URLs made from fetched responses.
DASHBOARD_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)
# The docs pages: FastAPI's HTML has an inline script and Swagger UI/ReDoc inject styles, so
# those are allowed inline; everything is still fetched from this origin only. This also stops
# ReDoc's side-menu logo, which its bundle loads from cdn.redoc.ly, before it leaves the browser
# (the image hides itself when it fails to load).
DOCS_CSP = (
    "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; font-src 'self' data:; connect-src 'self'; worker-src 'self' blob:; "
    "object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)
_PAGE_HEADERS = {
    "Content-Security-Policy": DASHBOARD_CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def _docs_page(page: HTMLResponse) -> HTMLResponse:
    page.headers["Content-Security-Policy"] = DOCS_CSP
    page.headers["X-Content-Type-Options"] = "nosniff"
    return page


def _router(app: FastAPI) -> APIRouter:
    router = APIRouter(include_in_schema=False)
    openapi_url = app.openapi_url or "/openapi.json"
    oauth2_redirect = app.swagger_ui_oauth2_redirect_url or "/docs/oauth2-redirect"

    @router.get("/")
    def dashboard() -> FileResponse:
        """The dashboard: one page (hash routes ``#/``, ``#/jobs/<id>``, ``#/new``)."""
        return FileResponse(STATIC_DIR / "dashboard" / "index.html", headers=_PAGE_HEADERS)

    @router.get("/docs")
    def swagger_ui() -> HTMLResponse:
        return _docs_page(get_swagger_ui_html(
            openapi_url=openapi_url,
            title=f"{app.title} - Swagger UI",
            oauth2_redirect_url=oauth2_redirect,
            swagger_js_url=f"{VENDOR_URL}/swagger-ui/swagger-ui-bundle.js",
            swagger_css_url=f"{VENDOR_URL}/swagger-ui/swagger-ui.css",
            swagger_favicon_url=f"{VENDOR_URL}/swagger-ui/favicon-32x32.png",
            # validatorUrl None: no badge image fetched from validator.swagger.io.
            swagger_ui_parameters={"validatorUrl": None},
        ))

    @router.get(oauth2_redirect)
    def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @router.get("/redoc")
    def redoc() -> HTMLResponse:
        return _docs_page(get_redoc_html(
            openapi_url=openapi_url,
            title=f"{app.title} - ReDoc",
            redoc_js_url=f"{VENDOR_URL}/redoc/redoc.standalone.js",
            redoc_favicon_url=f"{VENDOR_URL}/swagger-ui/favicon-32x32.png",
            with_google_fonts=False,
        ))

    return router


def install_dashboard(app: FastAPI) -> None:
    """Serve the dashboard at ``/``, the static files at ``/static`` and the offline API docs
    at ``/docs`` and ``/redoc``. The app must be built with ``docs_url=None, redoc_url=None``
    (else FastAPI's CDN pages would answer first). Raises ``RuntimeError`` when the package
    data is missing (an install without ``app/static``)."""
    if not (STATIC_DIR / "dashboard" / "index.html").is_file():
        raise RuntimeError(f"the dashboard's files are missing from {STATIC_DIR} "
                           "(package data of the lmforge distribution)")
    if app.docs_url is not None or app.redoc_url is not None:
        raise RuntimeError("build the app with docs_url=None, redoc_url=None: "
                           "install_dashboard serves the offline docs itself")
    app.include_router(_router(app))
    app.mount(STATIC_URL, StaticFiles(directory=STATIC_DIR), name="static")
