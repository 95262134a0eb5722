"""A real headless Chromium for the tests of what people open in a browser (the page at ``/``,
``/docs``), driven by Selenium.

Debian's ``chromium`` and ``chromium-driver`` packages (``/usr/bin/chromium``,
``/usr/bin/chromedriver``; .ci/run installs them): Selenium is handed both paths, so it never
runs Selenium Manager, which would try to download a driver and a browser. A test that needs
the browser fails — never skips — when either is missing, saying what to install.

The browser reaches nothing but the gateway under test: every other host name fails to
resolve and its background networking (updates, sync) is off, so a page that loads anything
from elsewhere fails in its console, which :func:`console_errors` reads (a
Content-Security-Policy violation is logged there too).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.wait import WebDriverWait

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
#: The window every test (and every screenshot) gets, in CSS pixels at scale 1.
WINDOW_SIZE = (1280, 900)
_ARGUMENTS = (
    "--headless=new",
    # CI runs as root, where Chromium's sandbox cannot start.
    "--no-sandbox",
    # Containers give /dev/shm 64 MB; Chromium's renderers would crash on bigger pages.
    "--disable-dev-shm-usage",
    "--disable-gpu",
    f"--window-size={WINDOW_SIZE[0]},{WINDOW_SIZE[1]}",
    "--force-device-scale-factor=1",
    "--lang=en-US",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-extensions",
    # Every host name but the gateway's fails to resolve: a page that loads anything from
    # elsewhere fails here as it would offline, even on a machine with internet.
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
)


def _options() -> webdriver.ChromeOptions:
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in _ARGUMENTS:
        options.add_argument(argument)
    # Keep every console message, so console_errors sees warnings' neighbours too.
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return options


@contextmanager
def chromium() -> Iterator[webdriver.Chrome]:
    """A started headless Chromium, quit on exit; a missing browser or driver fails the test."""
    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.is_file()]
    if missing:
        pytest.fail(
            f"the browser tests need Chromium and its driver; missing: {', '.join(missing)}. "
            "Install them: apt-get install chromium chromium-driver",
            pytrace=False,
        )
    driver = webdriver.Chrome(
        options=_options(), service=Service(executable_path=str(CHROMEDRIVER))
    )
    try:
        driver.set_page_load_timeout(60)
        yield driver
    finally:
        driver.quit()


def console_errors(driver: webdriver.Chrome) -> list[str]:
    """The console's errors (level SEVERE) logged since the last call — uncaught exceptions,
    resources that failed to load, Content-Security-Policy violations — as their messages.

    Each call reads and clears the log, so a test reads it once before and once after what it
    checks."""
    return [entry["message"] for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def wait_for(driver: webdriver.Chrome, css_selector: str, timeout_s: float = 30.0) -> WebElement:
    """The first element matching ``css_selector`` once it is visible; a timeout fails with
    the selector and the console's errors, which usually say why the page did not get there."""
    try:
        return WebDriverWait(driver, timeout_s).until(
            expected_conditions.visibility_of_element_located(("css selector", css_selector))
        )
    except TimeoutException as exc:
        raise AssertionError(f"{css_selector!r} not visible: {console_errors(driver)}") from exc
