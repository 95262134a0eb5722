"""``/docs`` is served whole by the gateway: Swagger UI renders the API's operations in a real
headless Chromium that reaches no other host (tests/browser.py), with nothing in its console,
and every URL the page names is one the gateway answers. With API keys on, the page still
loads without one, and a person who authorizes with a key can try the API from it."""

from __future__ import annotations

import re
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import httpx
import pytest
from selenium import webdriver
from selenium.webdriver.common.by import By

from cnnserve.gateway.docs_page import DOCS_PATH, docs_files
from tests.browser import console_errors, wait_for
from tests.support import GatewayProcess, gateway_process

KEY = "k-docs-page-2b7e04"

#: The attributes that make a browser load something.
URL_ATTRIBUTES = {"src", "href", "data-openapi-url"}
#: What each kind of file must be served as (with ``nosniff`` a browser checks it).
CONTENT_TYPES = {
    ".js": "text/javascript",
    ".css": "text/css",
    ".png": "image/png",
    ".json": "application/json",
}


class _Urls(HTMLParser):
    """Every URL an HTML page names in :data:`URL_ATTRIBUTES`, and its inline scripts."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []
        self.inline_scripts: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.urls += [value for name, value in attrs if name in URL_ATTRIBUTES and value]
        self._in_script = tag == "script"

    def handle_endtag(self, tag: str) -> None:
        self._in_script = False

    def handle_data(self, data: str) -> None:
        if self._in_script and data.strip():
            self.inline_scripts.append(data)


def test_swagger_ui_renders_the_operations_offline(
    browser: webdriver.Chrome, page_gateway: GatewayProcess
) -> None:
    console_errors(browser)
    browser.get(f"http://{page_gateway.http_target}{DOCS_PATH}")
    infer = wait_for(browser, '.opblock-post [data-path="/v2/models/{model}/infer"]')
    assert infer.text.replace("\u200b", "") == "/v2/models/{model}/infer"
    # The whole document rendered: one block per operation, as many as the OpenAPI lists.
    document = httpx.get(f"http://{page_gateway.http_target}/openapi.json", timeout=30).json()
    operations = sum(len(methods) for methods in document["paths"].values())
    assert len(browser.find_elements("css selector", ".opblock")) == operations
    assert browser.find_element("css selector", ".info .title").text.startswith("cnnserve")
    assert console_errors(browser) == []


def test_every_url_the_page_names_is_served_by_the_gateway(page_gateway: GatewayProcess) -> None:
    page_url = f"http://{page_gateway.http_target}{DOCS_PATH}"
    page = httpx.get(page_url, timeout=30)
    assert page.status_code == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    found = _Urls()
    found.feed(page.text)
    assert found.inline_scripts == []  # the Content-Security-Policy would refuse them
    # Each of its files once, and the OpenAPI document.
    assert sorted(found.urls) == sorted({*docs_files(), "/openapi.json"} - {DOCS_PATH})
    for url in found.urls:
        absolute = urljoin(page_url, url)
        assert urlsplit(absolute).netloc == urlsplit(page_url).netloc, url
        reply = httpx.get(absolute, timeout=30)
        assert reply.status_code == 200, url
        suffix = url[url.rfind(".") :]
        assert reply.headers["content-type"].startswith(CONTENT_TYPES[suffix]), url
        if suffix == ".css":
            # Everything the style sheet draws is inside it.
            images = re.findall(r"url\(\s*[\"']?([^\"')]+)", reply.text)
            assert images and all(image.startswith("data:") for image in images)


def test_fastapi_s_own_pages_are_gone(page_gateway: GatewayProcess) -> None:
    """FastAPI's ReDoc and OAuth2 redirect pages load scripts from a CDN or inline: not served."""
    for path in ("/redoc", f"{DOCS_PATH}/oauth2-redirect", f"{DOCS_PATH}/index.html"):
        assert (
            httpx.get(f"http://{page_gateway.http_target}{path}", timeout=30).status_code == 404
        ), path


@pytest.fixture(scope="module")
def keyed_gateway(
    model_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    """A ``cnnserve serve`` process with an API key, as ``make deploy`` runs one."""
    log = tmp_path_factory.mktemp("docs_keyed") / "gateway.log"
    with gateway_process(
        "onnxruntime", log, model_repository=model_repository, device="cpu", api_key=KEY
    ) as gateway:
        yield gateway
    assert "Traceback" not in gateway.output(), gateway.output()[-4000:]


def test_with_keys_on_the_page_tries_the_api_with_the_key_given(
    browser: webdriver.Chrome, keyed_gateway: GatewayProcess
) -> None:
    console_errors(browser)
    browser.get(f"http://{keyed_gateway.http_target}{DOCS_PATH}")
    wait_for(browser, "button.authorize").click()
    wait_for(browser, ".modal-ux input").send_keys(KEY)
    browser.find_element(By.CSS_SELECTOR, ".modal-ux .auth-btn-wrapper button.authorize").click()
    browser.find_element(By.CSS_SELECTOR, ".modal-ux button.close-modal").click()
    # Server metadata, GET /v2: 401 without the key.
    wait_for(browser, '.opblock-get [data-path="/v2"]').click()
    operation = browser.find_element(By.CSS_SELECTOR, ".opblock-get.is-open")
    operation.find_element(By.CSS_SELECTOR, "button.try-out__btn").click()
    operation.find_element(By.CSS_SELECTOR, "button.execute").click()
    status = wait_for(
        browser, ".opblock-get.is-open .live-responses-table .response .response-col_status"
    )
    assert status.text.split()[0] == "200"
    curl = operation.find_element(By.CSS_SELECTOR, ".curl-command .microlight").text
    assert f"Authorization: Bearer {KEY}" in curl
    body = operation.find_element(By.CSS_SELECTOR, ".response .response-col_description pre")
    assert '"name": "cnnserve"' in body.text
    assert console_errors(browser) == []
