"""The browser harness (tests/browser.py) itself: without Chromium or its driver a browser test
fails, naming the packages to install — it never skips, so a machine without a browser cannot
pass the suite with the pages untested."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import browser


@pytest.mark.parametrize("missing", ["CHROMIUM", "CHROMEDRIVER"])
def test_a_missing_browser_fails_naming_what_to_install(
    missing: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    absent = tmp_path / "absent"
    monkeypatch.setattr(browser, missing, absent)
    with pytest.raises(pytest.fail.Exception) as failed, browser.chromium():
        pass
    assert str(absent) in str(failed.value)
    assert "apt-get install chromium chromium-driver" in str(failed.value)
