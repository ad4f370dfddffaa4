"""/admin/api/docs in a real browser with the network cut off: Swagger UI comes from the
package, and no request leaves loopback."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from control_support import start_control
from harness import chromium


def test_the_docs_render_offline(tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    executable = chromium()
    cp = start_control(tmp_path, f"sqlite:///{tmp_path / 'cp.db'}")
    outside: list[str] = []
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=executable, args=["--no-sandbox"])
            try:
                page = browser.new_page()

                def only_loopback(route, request) -> None:  # type: ignore[no-untyped-def]
                    if urlsplit(request.url).hostname in ("127.0.0.1", "localhost"):
                        route.continue_()
                    else:
                        outside.append(request.url)
                        route.abort()

                page.route("**/*", only_loopback)
                page.goto(f"{cp.url}/admin/api/docs")
                title = page.locator(".swagger-ui .info .title")
                title.wait_for(timeout=20_000)
                assert "meshgate control plane" in title.inner_text()
                # The operations are listed, read from the OpenAPI document.
                page.locator(
                    ".opblock-summary-path", has_text="/admin/api/products"
                ).first.wait_for()
                page.screenshot(path=str(tmp_path / "admin-api-docs.png"), full_page=False)
            finally:
                browser.close()
    finally:
        cp.stop()
    assert outside == [], outside
