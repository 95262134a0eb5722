"""The pages' Content-Security-Policy and ``nosniff`` (gateway/security_headers.py): on every
page and file a browser loads, not on the API's answers, and enforced by a real Chromium."""

from __future__ import annotations

import httpx
from selenium import webdriver

from cnnserve.gateway.security_headers import CONTENT_SECURITY_POLICY
from tests.browser import console_errors, wait_for
from tests.support import GatewayProcess

#: Every page and file a browser loads, and a file that is not there (still a page's path).
PAGE_PATHS = [
    "/",
    "/ui/page.js",
    "/ui/page.css",
    "/ui/no-such-file.js",
    "/docs",
    "/docs/swagger-initializer.js",
    "/docs/swagger-ui-bundle.js",
    "/docs/swagger-ui.css",
    "/docs/favicon-32x32.png",
    "/openapi.json",
]
#: Answers of the API, which programs read: no page headers.
API_PATHS = ["/v2/health/ready", "/v2", "/v2/models/convnet"]


def test_the_policy_runs_scripts_from_the_gateway_only() -> None:
    directives = dict(d.split(" ", 1) for d in CONTENT_SECURITY_POLICY.split("; "))
    assert directives["default-src"] == "'self'"
    assert directives["script-src"] == "'self'"
    assert directives["object-src"] == directives["base-uri"] == "'none'"
    assert directives["frame-ancestors"] == "'none'"
    assert "unsafe" not in CONTENT_SECURITY_POLICY  # no inline script or style, no eval


def test_every_page_path_has_the_headers(page_gateway: GatewayProcess) -> None:
    with httpx.Client(base_url=f"http://{page_gateway.http_target}", timeout=30) as http:
        for path in PAGE_PATHS:
            reply = http.get(path)
            assert reply.status_code == (404 if "no-such" in path else 200), path
            assert reply.headers["content-security-policy"] == CONTENT_SECURITY_POLICY, path
            assert reply.headers["x-content-type-options"] == "nosniff", path
        for path in API_PATHS:
            reply = http.get(path)
            assert reply.status_code == 200, path
            assert "content-security-policy" not in reply.headers, path


def test_chromium_refuses_an_inline_script_on_the_pages(
    browser: webdriver.Chrome, page_gateway: GatewayProcess
) -> None:
    """Text that reached a page as a script element would not run: the browser holds the
    page to the policy it was served with."""
    for path, loaded in (("/", "h1"), ("/docs", ".opblock")):
        console_errors(browser)
        browser.get(f"http://{page_gateway.http_target}{path}")
        wait_for(browser, loaded)
        browser.execute_script(
            "const s = document.createElement('script');"
            "s.textContent = 'window.inlineRan = true';"
            "document.body.appendChild(s);"
        )
        assert browser.execute_script("return window.inlineRan === true") is False, path
        errors = console_errors(browser)
        assert len([e for e in errors if "Content Security Policy" in e]) == 1, errors
