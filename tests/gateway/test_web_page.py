"""The web page at ``/`` in a real headless Chromium, against a real gateway (``cnnserve serve``,
onnxruntime backend) with API keys on.

A person's steps, each checked against what the gateway itself answers for the same input:
upload a digit and read its label, draw one, upload or generate a scene and see its mask over
it with a legend and the pixels per class, look at a layer's feature maps, choose a model and
a version, enter the key. The page loads nothing from elsewhere and runs no inline script
(the console, where the browser reports a Content-Security-Policy violation, stays clean).

Screenshots: every test that shows a result saves one, into ``$CNNSERVE_SCREENSHOTS`` when set
— ``CNNSERVE_SCREENSHOTS=docs/images pytest tests/gateway/test_web_page.py`` refreshes the
README's — and into a temporary folder otherwise.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image
from selenium import webdriver
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.actions import interaction
from selenium.webdriver.common.actions.pointer_input import PointerInput
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.select import Select
from selenium.webdriver.support.wait import WebDriverWait

from cnnserve.models.features import FEATURE_LAYERS
from cnnserve.models.registry import SHAPE_CLASSES
from cnnserve.models.spec import Architecture
from tests.browser import console_errors
from tests.gateway.test_model_repository import copy_repository, edit_config
from tests.images import digit_png, png_declaring, shapes_png
from tests.support import GatewayProcess, gateway_process

KEY = "k-web-page-5c1e93"
AUTH = {"authorization": f"Bearer {KEY}"}
#: Where the screenshots go when asked (the README's are made this way, into docs/images).
SCREENSHOTS_VARIABLE = "CNNSERVE_SCREENSHOTS"
#: Long enough for a gateway's first inference on a busy 2-core machine.
ANSWER_TIMEOUT_S = 60.0
LATENCY = re.compile(r"^\d+ ms$")


@pytest.fixture(scope="module")
def two_convnet_versions(model_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default repository with its ConvNet served as versions 1 and 2 (the same files)."""
    repository = copy_repository(model_repository, tmp_path_factory.mktemp("web") / "repo")
    shutil.copytree(repository / "convnet" / "1", repository / "convnet" / "2")
    edit_config(repository, "convnet", version_policy={"all": {}})
    return repository


@pytest.fixture(scope="module")
def gateway(
    two_convnet_versions: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    """``cnnserve serve --backend onnxruntime`` with an API key, in its own process: the
    browser and the test talk to it while it runs its own event loop."""
    log = tmp_path_factory.mktemp("web_gateway") / "gateway.log"
    with gateway_process(
        "onnxruntime",
        log,
        model_repository=two_convnet_versions,
        device="cpu",
        api_key=KEY,
        inference_threads=1,
    ) as running:
        yield running
    assert "Traceback" not in running.output(), running.output()[-4000:]


@pytest.fixture(scope="module")
def http(gateway: GatewayProcess) -> Iterator[httpx.Client]:
    """A client of the same gateway, carrying the key: what the page shows is checked
    against its answers."""
    with httpx.Client(base_url=f"http://{gateway.http_target}", headers=AUTH, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder the screenshots go to (see the module's docstring)."""
    chosen = os.environ.get(SCREENSHOTS_VARIABLE)
    folder = Path(chosen) if chosen else tmp_path_factory.mktemp("screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture
def page(browser: webdriver.Chrome, gateway: GatewayProcess) -> Iterator[webdriver.Chrome]:
    """The page freshly loaded with no key stored: it has asked for one. Its console is
    checked clean after the test."""
    browser.get(f"http://{gateway.http_target}/")
    browser.execute_script("sessionStorage.clear()")
    browser.refresh()
    wait(browser, lambda d: element(d, "settings-status").text, "the page asking for the key")
    # Without a key the page is refused the model list; nothing else may go wrong.
    assert all("401" in message for message in console_errors(browser))
    yield browser
    assert console_errors(browser) == []


def element(driver: webdriver.Chrome, element_id: str) -> WebElement:
    return driver.find_element(By.ID, element_id)


def wait(driver: webdriver.Chrome, condition: Any, what: str) -> Any:
    """Wait for ``condition(driver)`` to be true; fail saying ``what`` and the console's
    errors and the page's status lines, which tell why the page did not get there."""
    try:
        return WebDriverWait(driver, ANSWER_TIMEOUT_S).until(condition)
    except Exception as exc:
        statuses = driver.execute_script(
            "return [...document.querySelectorAll('.status')].map(e => e.id + ': ' + e.textContent)"
        )
        raise AssertionError(f"{what}: {statuses} {console_errors(driver)}") from exc


def enter_key(driver: webdriver.Chrome) -> None:
    """Type the key and press Enter, as a person does; the models are then listed."""
    field = element(driver, "api-key")
    field.clear()
    field.send_keys(KEY, Keys.ENTER)
    wait(driver, model_names, "the models listed")


def options(driver: webdriver.Chrome, select_id: str) -> list[str]:
    """The values a select offers, in order."""
    return [o.get_attribute("value") or "" for o in Select(element(driver, select_id)).options]


def model_names(driver: webdriver.Chrome) -> list[str]:
    return options(driver, "model-select")


def upload(driver: webdriver.Chrome, input_id: str, data: bytes, folder: Path) -> None:
    """Choose a file holding ``data`` in the file input ``input_id``."""
    path = folder / f"{input_id}.png"
    path.write_bytes(data)
    element(driver, input_id).send_keys(str(path))


def latency(driver: webdriver.Chrome, section: str) -> str:
    text: str = element(driver, section).find_element(By.CLASS_NAME, "latency").text
    return text


def screenshot(driver: webdriver.Chrome, section: str, path: Path) -> None:
    """A picture of one section of the page, scrolled into view first: the browser draws
    only what the window shows."""
    part = element(driver, section)
    driver.execute_script("arguments[0].scrollIntoView()", part)
    part.screenshot(str(path))


def bars(driver: webdriver.Chrome) -> list[tuple[str, str]]:
    """The probability chart's rows: (label, percentage shown)."""
    rows = element(driver, "convnet-probs").find_elements(By.TAG_NAME, "li")
    return [
        (cells[0].text, cells[-1].text) for cells in (r.find_elements(By.XPATH, "*") for r in rows)
    ]


def counts_table(driver: webdriver.Chrome) -> dict[str, int]:
    """The pixels per class the page shows, in the order shown."""
    rows = element(driver, "fcn-counts").find_elements(By.TAG_NAME, "tr")[1:]
    return {
        r.find_element(By.TAG_NAME, "th").text: int(r.find_element(By.TAG_NAME, "td").text)
        for r in rows
    }


def overlay_pixels(driver: webdriver.Chrome) -> tuple[int, int, int]:
    """Width, height and painted (not see-through) pixels of the mask over the scene."""
    width, height, painted = driver.execute_script(
        """const canvas = document.getElementById("fcn-overlay");
        const data = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
        let painted = 0;
        for (let i = 3; i < data.length; i += 4) if (data[i] > 0) painted++;
        return [canvas.width, canvas.height, painted];"""
    )
    return int(width), int(height), int(painted)


def canvas_size(driver: webdriver.Chrome, canvas_id: str) -> tuple[int, int]:
    width, height = driver.execute_script(
        "const c = document.getElementById(arguments[0]); return [c.width, c.height];", canvas_id
    )
    return int(width), int(height)


def png_size(data: bytes) -> tuple[int, int]:
    size: tuple[int, int] = Image.open(io.BytesIO(data)).size
    return size


def mask_counts(http: httpx.Client, scene: bytes) -> dict[str, int]:
    """The gateway's own pixels per class for ``scene``."""
    reply = http.post("/predict/fcn", content=scene)
    assert reply.status_code == 200, reply.text
    counts: dict[str, int] = json.loads(reply.headers["x-pixel-counts"])
    return counts


def stats_count(http: httpx.Client, model: str, version: str) -> int:
    """How many inferences ``version`` of ``model`` has run."""
    reply = http.get(f"/v2/models/{model}/versions/{version}/stats")
    assert reply.status_code == 200, reply.text
    (stats,) = reply.json()["model_stats"]
    return int(stats.get("inference_count", 0))


# --- what the gateway serves ---


class _Tags(HTMLParser):
    """Every start tag of a document with its attributes, and whether a script has a body."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.script_text = ""
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        self._in_script = tag == "script"

    def handle_endtag(self, tag: str) -> None:
        self._in_script = False

    def handle_data(self, data: str) -> None:
        if self._in_script:
            self.script_text += data.strip()


def test_the_page_and_its_files_are_public_and_served_by_the_gateway(
    gateway: GatewayProcess,
) -> None:
    """Without a key: the page and the files it names load; nothing else does. The page runs
    no inline script or handler and names no other site."""
    with httpx.Client(base_url=f"http://{gateway.http_target}", timeout=30) as anonymous:
        page = anonymous.get("/")
        assert page.status_code == 200
        assert page.headers["content-type"] == "text/html; charset=utf-8"
        tags = _Tags()
        tags.feed(page.text)
        assert tags.script_text == ""
        handlers = [(t, a) for t, a in tags.tags for name in a if name.startswith("on")]
        assert handlers == []
        linked = [a.get("src") or a.get("href") for t, a in tags.tags if t in {"script", "link"}]
        # The icon too: a browser asks for /favicon.ico, which is not public, unless told.
        media_types = {
            "/ui/icon.svg": "image/svg+xml",
            "/ui/page.css": "text/css; charset=utf-8",
            "/ui/page.js": "text/javascript; charset=utf-8",
        }
        assert sorted(str(path) for path in linked) == sorted(media_types)
        for path, media_type in media_types.items():
            asset = anonymous.get(path)
            assert asset.status_code == 200, path
            assert asset.headers["content-type"] == media_type
        # Only the page's own files: no path reaches the folder's neighbours.
        assert anonymous.get("/ui/..%2Fweb.py").status_code == 404
        assert anonymous.get("/ui/nothing.js").json()["error"].startswith("no such file")
        # The page is open; what it calls is not.
        assert anonymous.post("/v2/repository/index").status_code == 401
        assert anonymous.post("/predict/convnet", content=digit_png(0)[0]).status_code == 401


# --- in the browser ---


def test_the_key_is_asked_for_then_kept_in_the_tab_only(page: webdriver.Chrome) -> None:
    status = wait(page, lambda d: element(d, "settings-status").text, "the refusal shown")
    assert "missing API key" in status and "enter the gateway's API key" in status
    assert model_names(page) == []

    enter_key(page)
    assert model_names(page) == ["convnet", "fcn"]
    assert element(page, "settings-status").text == ""
    stored = page.execute_script(
        "return [sessionStorage.getItem('cnnserve.api-key'), localStorage.length, document.cookie]"
    )
    assert stored == [KEY, 0, ""]
    page.refresh()  # the same tab keeps it
    wait(page, model_names, "the models listed with the stored key")
    assert element(page, "api-key").get_attribute("value") == KEY


def test_an_uploaded_digit_gets_its_label_and_the_chart(
    page: webdriver.Chrome, tmp_path: Path, screenshots: Path
) -> None:
    enter_key(page)
    digit, label = digit_png(0)
    upload(page, "convnet-file", digit, tmp_path)
    shown = wait(page, lambda d: element(d, "convnet-label").text, "a label")
    assert shown == str(label)
    rows = bars(page)
    assert [name for name, _ in rows] == [str(i) for i in range(10)]
    assert sum(float(value.removesuffix(" %")) for _, value in rows) == pytest.approx(100, abs=1)
    assert LATENCY.match(latency(page, "convnet"))
    screenshot(page, "convnet", screenshots / "web-page-digit.png")


@pytest.mark.parametrize("pointer", [interaction.POINTER_MOUSE, interaction.POINTER_TOUCH])
def test_a_drawn_digit_gets_a_label(page: webdriver.Chrome, pointer: str) -> None:
    """A stroke drawn with the mouse, or with a finger on a touch screen."""
    enter_key(page)
    canvas = element(page, "convnet-canvas")
    # A stroke down the middle, as a "1" is drawn.
    stroke = ActionChains(page, devices=[PointerInput(pointer, pointer)])
    stroke.move_to_element_with_offset(canvas, 0, -90).click_and_hold()
    stroke.move_by_offset(0, 60).move_by_offset(0, 60).move_by_offset(0, 60).release().perform()
    shown = wait(page, lambda d: element(d, "convnet-label").text, "a label")
    assert shown in {str(i) for i in range(10)}
    assert len(bars(page)) == 10
    assert LATENCY.match(latency(page, "convnet"))
    # The stroke is on the canvas: white on black, as the training digits are drawn.
    assert page.execute_script(
        """const canvas = document.getElementById("convnet-canvas");
        const data = canvas.getContext("2d").getImageData(140, 140, 1, 1).data;
        return [data[0], data[1], data[2]];"""
    ) == [255, 255, 255]


#: A "3" as a person draws it with one stroke: the top arc, in to the middle, the bottom arc
#: (offsets from the canvas' centre, 280×280 on the page).
THREE = [
    (-45, -85),
    (0, -100),
    (45, -80),
    (50, -50),
    (25, -15),
    (-10, -5),
    (25, 5),
    (55, 40),
    (45, 80),
    (0, 100),
    (-50, 80),
]


def test_a_drawn_3_is_read_as_3(page: webdriver.Chrome) -> None:
    enter_key(page)
    canvas = element(page, "convnet-canvas")
    (start_x, start_y), *points = THREE
    stroke = ActionChains(page).move_to_element_with_offset(canvas, start_x, start_y)
    stroke.click_and_hold()
    previous = (start_x, start_y)
    for x, y in points:
        stroke.move_by_offset(x - previous[0], y - previous[1])
        previous = (x, y)
    stroke.release().perform()
    assert wait(page, lambda d: element(d, "convnet-label").text, "a label") == "3"


def test_a_refused_image_gets_the_gateways_reason(
    page: webdriver.Chrome, http: httpx.Client, tmp_path: Path
) -> None:
    enter_key(page)
    too_big = png_declaring(100_000, 100_000)
    upload(page, "convnet-file", too_big, tmp_path)
    shown = wait(page, lambda d: element(d, "convnet-status").text, "the refusal shown")
    reply = http.post("/predict/convnet", params={"top_k": 10}, content=too_big)
    assert reply.status_code == 400
    assert shown == reply.json()["error"]
    assert element(page, "convnet-label").text == ""
    refused = console_errors(page)  # the browser logs the 400 it was answered
    assert refused and all("400" in message for message in refused)


def test_an_uploaded_scene_gets_its_mask_legend_and_counts(
    page: webdriver.Chrome, http: httpx.Client, tmp_path: Path
) -> None:
    enter_key(page)
    scene, _ = shapes_png(seed=3, side=64)
    upload(page, "fcn-file", scene, tmp_path)
    wait(page, counts_table, "the pixel counts")
    expected = mask_counts(http, scene)
    assert counts_table(page) == expected
    legend = [li.text for li in element(page, "fcn-legend").find_elements(By.TAG_NAME, "li")]
    assert legend == list(SHAPE_CLASSES)
    # The mask lies on the scene at its size, painted where a shape was found.
    assert overlay_pixels(page) == (64, 64, 64 * 64 - expected["background"])
    assert canvas_size(page, "fcn-image") == (64, 64)
    assert LATENCY.match(latency(page, "fcn"))


def test_a_generated_scene_is_the_demo_scene_segmented(
    page: webdriver.Chrome, http: httpx.Client, screenshots: Path
) -> None:
    enter_key(page)
    element(page, "fcn-generate").click()
    wait(page, counts_table, "the pixel counts")
    scene = http.get("/demo/scene.png", params={"seed": 1})
    assert scene.status_code == 200, scene.text
    assert counts_table(page) == mask_counts(http, scene.content)
    assert canvas_size(page, "fcn-overlay") == png_size(scene.content)
    screenshot(page, "fcn", screenshots / "web-page-scene.png")


def test_a_layer_shows_its_feature_maps(
    page: webdriver.Chrome, http: httpx.Client, tmp_path: Path, screenshots: Path
) -> None:
    enter_key(page)
    layers = Select(element(page, "layer-select"))
    names = options(page, "layer-select")[1:]
    assert names == ["rgb", *FEATURE_LAYERS[Architecture.CONVNET]]
    digit, _ = digit_png(0)
    upload(page, "convnet-file", digit, tmp_path)
    wait(page, lambda d: element(d, "convnet-label").text, "a label")
    sizes = {}
    for layer in ("rgb", "conv1"):
        reply = http.post("/predict/convnet/features", params={"layer": layer}, content=digit)
        assert reply.status_code == 200, reply.text
        sizes[layer] = png_size(reply.content)
    assert sizes["rgb"] != sizes["conv1"]
    for layer, size in sizes.items():
        layers.select_by_value(layer)
        wait(page, lambda d, s=size: canvas_size(d, "features-image") == s, f"{layer}'s maps")
        assert LATENCY.match(latency(page, "features"))
    screenshot(page, "features", screenshots / "web-page-features.png")


def test_the_chosen_model_and_version_answer(
    page: webdriver.Chrome, http: httpx.Client, tmp_path: Path
) -> None:
    enter_key(page)
    versions = Select(element(page, "version-select"))
    assert options(page, "version-select") == ["2", "1"]
    assert element(page, "convnet-model").text == "— convnet v2"
    before = {v: stats_count(http, "convnet", v) for v in ("1", "2")}
    versions.select_by_value("1")
    wait(page, lambda d: "convnet v1" in element(d, "convnet-model").text, "version 1 chosen")
    digit, label = digit_png(0)
    upload(page, "convnet-file", digit, tmp_path)
    assert wait(page, lambda d: element(d, "convnet-label").text, "a label") == str(label)
    after = {v: stats_count(http, "convnet", v) for v in ("1", "2")}
    assert after == {"1": before["1"] + 1, "2": before["2"]}

    Select(element(page, "model-select")).select_by_value("fcn")
    assert options(page, "version-select") == ["1"]
    assert options(page, "layer-select")[1:] == ["rgb", *FEATURE_LAYERS[Architecture.FCN]]
    assert element(page, "fcn-model").text == "— fcn v1"


def test_the_whole_page(page: webdriver.Chrome, tmp_path: Path, screenshots: Path) -> None:
    """One pass through every panel: the README's screenshot."""
    enter_key(page)
    upload(page, "convnet-file", digit_png(0)[0], tmp_path)
    wait(page, lambda d: element(d, "convnet-label").text, "a label")
    Select(element(page, "layer-select")).select_by_value("conv1")
    wait(page, lambda d: canvas_size(d, "features-image")[0] > 3, "the feature maps")
    element(page, "fcn-generate").click()
    wait(page, counts_table, "the pixel counts")
    height = page.execute_script("return document.documentElement.scrollHeight")
    width = page.get_window_size()["width"]
    page.set_window_size(width, height + 120)
    try:
        page.save_screenshot(str(screenshots / "web-page.png"))
    finally:
        page.set_window_size(width, 900)
