"""The dashboard's and the API docs' pages are served by the API itself, from package data,
without a key, and name no URL off this server (the browser tests in
tests/e2e/test_dashboard.py check what a real browser then loads)."""

from __future__ import annotations

import re

from fastapi.testclient import TestClient

from app.routes.dashboard import STATIC_DIR

# Any absolute URL in a page: what the page would make a browser fetch from elsewhere.
_ABSOLUTE = re.compile(r"""(?:src|href)\s*=\s*["']?(?:https?:)?//""", re.I)
_CDN_HOSTS = ("cdn.jsdelivr.net", "unpkg.com", "fonts.googleapis.com", "fastapi.tiangolo.com")


def test_dashboard_page_needs_no_key_and_has_a_strict_csp(client: TestClient) -> None:
    client.headers.pop("Authorization")
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    csp = r.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "script-src 'self'" in csp
    assert "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp
    assert not _ABSOLUTE.search(r.text)
    assert '/static/vendor/uplot/uPlot.iife.min.js' in r.text


def test_docs_and_redoc_load_vendored_files_only(client: TestClient) -> None:
    client.headers.pop("Authorization")
    for path, assets in (
        ("/docs", ["/static/vendor/swagger-ui/swagger-ui-bundle.js",
                   "/static/vendor/swagger-ui/swagger-ui.css"]),
        ("/redoc", ["/static/vendor/redoc/redoc.standalone.js"]),
    ):
        r = client.get(path)
        assert r.status_code == 200, path
        # The browser may fetch from this origin only (the CSP also stops ReDoc's CDN logo).
        assert "default-src 'self'" in r.headers["content-security-policy"], path
        assert "img-src 'self' data:;" in r.headers["content-security-policy"], path
        for host in _CDN_HOSTS:
            assert host not in r.text, (path, host)
        for asset in assets:
            assert asset in r.text, (path, asset)
            got = client.get(asset)
            assert got.status_code == 200 and len(got.content) > 1000, asset
    assert client.get("/docs/oauth2-redirect").status_code == 200
    # The docs pages are not operations of the API.
    paths = client.get("/openapi.json").json()["paths"]
    assert not {"/", "/docs", "/redoc"} & set(paths)


def test_every_vendored_library_has_its_licence() -> None:
    vendor = STATIC_DIR / "vendor"
    libs = [d for d in vendor.iterdir() if d.is_dir()]
    assert {d.name for d in libs} == {"uplot", "swagger-ui", "redoc"}
    for lib in libs:
        assert (lib / "LICENSE").is_file(), lib
    readme = (vendor / "README.md").read_text()
    for name, version in (("uplot", "1.6.32"), ("swagger-ui-dist", "5.35.0"),
                          ("redoc", "2.5.4")):
        assert name in readme and version in readme


def test_static_files_of_the_dashboard_are_served(client: TestClient) -> None:
    for name in ("app.js", "style.css", "favicon.svg"):
        r = client.get(f"/static/dashboard/{name}")
        assert r.status_code == 200, name
        assert r.content == (STATIC_DIR / "dashboard" / name).read_bytes()
    assert client.get("/static/dashboard/missing.js").status_code == 404
    assert client.get("/static/../app/main.py").status_code == 404
